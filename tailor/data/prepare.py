"""`tailor prepare`: raw files in, a prepared dataset folder out.

read → clean and measure → filter and exact duplicates → anonymize (exact again where it changed a
record) → near duplicates → split → write → the base model's perplexity on the answers → card

Records live in Arrow files (Hugging Face `datasets`) between stages, so memory stays flat as the
input grows; cleaning and measuring run in worker processes. Every record read ends up in exactly
one place: a split, or rejects.jsonl with its stage and reason, so the card's counts add up. The
folder is built under a temporary name and renamed when complete; it replaces only an empty folder
or one prepare wrote. Records name their file relative to the input given (`id`, `source`): an
absolute path would carry the machine's folders, a user name among them, into every run folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from tailor.data.chat import source_options
from tailor.data.clean import clean_text, normalized, prompt_of, texts_of, with_texts
from tailor.data.dedup import NearDuplicates, exact_key, sharing_a_band, signatures
from tailor.data.example import DataError, check_example
from tailor.data.split import SPLITS, assign_splits, group_records, shared_prompts
from tailor.data.store import column, features, from_row, is_prepared, record_id, to_row
from tailor.errors import TailorError
from tailor.files import replace_dir
from tailor.spec import EMBEDDED_DEFAULT, DataSpec, SourceSpec

BATCH = 512
MAX_FAIL_PROBLEMS = 10


@dataclass
class Prepared:
    out: Path
    card: dict
    review: Path | None = None  # the names to review, where asked for and anything was replaced


def prepare(inputs: list, out: str | Path, model: str = EMBEDDED_DEFAULT, config: DataSpec | dict | None = None,
            num_proc: int | None = None, say=print, review: str | Path | None = None, **options: Any) -> Prepared:
    """Prepare `inputs` (paths, or {path, format, task, task_column, columns}) into `out`.

    `config` is a DataSpec or its dict (the `data:` section of a job, or data.yaml); keyword
    options override its sections, e.g. `privacy={"strategy": "pseudonym"}`, `on_error="fail"`.
    `review`: a file outside `out` (and outside any run folder) for the names and other NER values
    anonymization replaced, with their counts, for the data's owner to turn into an allow-list
    (privacy/review.py); written only when something was replaced (else an earlier one there is
    removed: it no longer describes `out`). None: no such file.
    """
    import datasets

    datasets.disable_progress_bars()  # `say` reports each stage; bars from every map would drown it
    spec = _spec(config, options)
    review = _check_review(review, Path(out), spec.privacy.allow_from, say)
    sources = [SourceSpec(path=str(s)) if isinstance(s, (str, Path)) else SourceSpec.model_validate(s)
               if isinstance(s, dict) else s for s in (inputs or spec.train)]
    if not sources:
        raise DataError(["no input: name at least one file or folder to prepare"])
    out = Path(out)
    _check_out(out, [Path(s.path) for s in sources])
    num_proc = num_proc if num_proc is not None else min(2, os.cpu_count() or 1)
    anonymizer = _anonymizer(spec, num_proc) if spec.privacy.enabled else None  # fails early without its model
    work = out.parent / f".{out.name}.partial"
    if work.exists():
        # A run killed outright (SIGKILL, power loss) could not remove it, and its cache holds the
        # records as read: personal data not yet anonymized.
        say(f"removing {work}, left by an interrupted run (it held records not yet anonymized)")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        with _terminate_as_exit():
            return _prepare(sources, out, work, model, spec, anonymizer, num_proc, say, review)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # a failed run leaves nothing half-written, nor raw records
        raise
    finally:
        if anonymizer is not None:
            anonymizer.close()  # its worker processes


def _prepare(sources, out: Path, work: Path, model: str, spec: DataSpec, anonymizer, num_proc: int, say,
             review: Path | None) -> Prepared:
    tokenizer, overhead = _tokenizer(model)
    found_values: Counter = Counter()  # {(entity, value): count} for the owner's review; never written into `out`
    labels = _source_labels(sources)
    stats: dict[str, Any] = {"model": model, "sources": [{**s.model_dump(exclude_defaults=True), "path": label}
                                                         for s, label in zip(sources, labels)]}
    clock = _Stopwatch(stats.setdefault("seconds", {}))

    with _Rejects(work / "rejects.jsonl", anonymizer) as rejects:
        with clock("read"):
            ds = _read(sources, labels, work, rejects, spec.on_error)
        stats["read"] = len(ds) + rejects.count
        stats["rejected"] = rejects.count
        say(f"read {stats['read']:,} records from {len(sources)} input(s); {rejects.count:,} rejected")

        with clock("clean"), _environ_kept():
            ds = ds.map(_Measure(spec, tokenizer, overhead), batched=True, batch_size=BATCH,
                        num_proc=num_proc if num_proc > 1 and len(ds) >= 4 * BATCH else None,
                        new_fingerprint="measured", desc="cleaning")
        # Exact copies go before anonymization, which is the costly stage; near duplicates after it,
        # on what the model will see: prompts and answers that differed only in a name or a number
        # can be the same text once anonymized ("who is <PERSON>?"), and then they are one record.
        # `rows`: the records of `ds` still in; `ds` itself is narrowed only where a stage needs it,
        # since every select makes later reads go through an index.
        stats["filter_reasons"], stats["duplicates"] = Counter(), {"exact": 0, "near": 0}
        with clock("deduplicate"):
            rows = _filter_and_exact(ds, spec, rejects, stats, "exact duplicate")
        say(f"cleaned: {sum(stats['filter_reasons'].values()):,} filtered, "
            f"{stats['duplicates']['exact']:,} exact duplicates removed")

        if anonymizer is not None:
            with clock("anonymize"):
                ds, dropped, pii = _anonymize(ds.select(rows), anonymizer, spec.privacy, rejects, work, spec.dedup,
                                              found_values)
            rows = [i for i in range(len(ds)) if i not in dropped]
            stats["privacy"] = pii
            stats["filter_reasons"].update(Counter(dropped.values()))
            say(f"anonymized: {pii['records_with_pii']:,} records had personal data "
                f"({', '.join(f'{k} {v:,}' for k, v in pii['entities'].items()) or 'none'}); "
                f"{pii['answers_changed']:,} of {pii['answers']:,} answers changed, {pii['answers_emptied']:,} "
                f"left as nothing but placeholders")
            if pii["records_with_pii"] and spec.privacy.strategy != "drop":
                before = stats["duplicates"]["exact"]
                with clock("deduplicate"):
                    rows = _filter_and_exact(ds, spec, rejects, stats, "exact duplicate once anonymized", among=rows)
                if stats["duplicates"]["exact"] > before:
                    say(f"{stats['duplicates']['exact'] - before:,} records became exact duplicates once anonymized")
        with clock("deduplicate"):
            kept, cluster = _near(ds, rows, spec, rejects, stats)
        say(f"near duplicates: {stats['duplicates']['near']:,} removed")
        stats["filtered"] = sum(stats["filter_reasons"].values())
        stats["filter_reasons"] = dict(stats["filter_reasons"])
        stats["rejects_by_stage"] = dict(rejects.by_stage)

    # Split the kept records; a cluster names its representative by its index before `select`.
    position = {old: new for new, old in enumerate(kept)}
    clusters = [position.get(cluster[i]) if i in cluster else None for i in kept]
    ds = ds.select(kept)
    with clock("split"):
        split_of = _split(ds, clusters, spec)
        stats["kept"] = len(ds)
        _write_splits(ds, split_of, work)
        stats["leakage"] = {"shared_prompts": shared_prompts(split_of, column(ds, "prompt")),
                            "near_duplicates_across_splits": _near_leaks(ds, split_of, spec)}

    from tailor.data.card import write_card
    from tailor.data.perplexity import answer_perplexity

    with clock("perplexity"):
        stats["perplexity"] = answer_perplexity(ds, [i for i, s in enumerate(split_of) if s == "train"], model,
                                                spec.card.perplexity_sample)
    with clock("card"):
        card = write_card(work, ds, split_of, stats, spec, model)
    shutil.rmtree(work / "cache", ignore_errors=True)
    replace_dir(work, out)
    if review is not None and found_values:
        from tailor.data.privacy.review import write_review

        write_review(review, found_values, ", ".join(str(s.path) for s in sources))
    elif review is not None:
        review.unlink(missing_ok=True)  # an earlier run's review no longer says what this folder replaced
    return Prepared(out=out, card=card, review=review if review is not None and found_values else None)


def _check_out(out: Path, inputs: list[Path]) -> None:
    """`out` is replaced as a whole: it may be new, empty or a dataset prepare wrote, and no input
    may be in it (the input would be deleted) nor hold it (the next run would read the prepared
    dataset as input). Checked before anything is read or loaded."""
    target = out.resolve()
    for path in inputs:
        source = path.resolve()
        if source == target or target in source.parents:
            raise TailorError(f"output folder {out}: the input {path} is {'it' if source == target else 'inside it'}, "
                              "and the output folder is replaced as a whole; name another folder for the prepared "
                              f"dataset, e.g. {out.parent / (out.name + '-prepared')}")
        if source.is_dir() and source in target.parents:
            raise TailorError(f"output folder {out} is inside the input folder {path}: the next `tailor prepare "
                              f"{path}` would read the prepared dataset as input; put it outside, e.g. "
                              f"{source.parent / (source.name + '-prepared')}")
    if out.is_file() or out.is_symlink() and not out.is_dir():
        raise TailorError(f"output folder {out}: a file is there; name a folder for the prepared dataset")
    if out.is_dir() and any(out.iterdir()) and not _written_by_prepare(out):
        entries = sorted(p.name for p in out.iterdir())
        shown = ", ".join(entries[:5]) + (", …" if len(entries) > 5 else "")
        raise TailorError(f"output folder {out} holds {len(entries)} file(s) or folder(s) ({shown}) and is not a "
                          "dataset `tailor prepare` wrote (card.json, rejects.jsonl and train/); the output folder is "
                          "replaced as a whole, so nothing was touched: name a new or empty folder, or delete this "
                          "one yourself if it is meant to go")


def _written_by_prepare(folder: Path) -> bool:
    return is_prepared(folder) and (folder / "rejects.jsonl").is_file()


@contextmanager
def _terminate_as_exit():
    """While prepare runs, SIGTERM (what `kill` and most process managers send) ends it through
    SystemExit, so the partial folder and its raw records are removed as for an error or Ctrl-C.
    Only in the main thread, and only where SIGTERM still has its default action (an application
    that handles it keeps its own handler). A worker process forked meanwhile inherits the handler
    and just exits, as the default would have it."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    owner = os.getpid()

    def stop(signum, frame):
        if os.getpid() != owner:
            os._exit(128 + signum)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _check_review(review: str | Path | None, out: Path, allow_from: list[str], say) -> Path | None:
    """The review file holds original personal data: never inside the dataset folder it describes.
    Nor one that privacy.allow_from reads (None then): written again, it would bring back the names
    its owner deleted from it, and the next run that reads it would keep them."""
    if review is None:
        return None
    review, folder = Path(review), out.resolve()
    if review.resolve() == folder or folder in review.resolve().parents:
        raise TailorError(f"review file {review} is inside the prepared folder {out}: it holds the original "
                          "names, which must not travel with the data; put it beside the folder, e.g. "
                          f"{out.parent / (out.name + '.privacy-review.txt')}")
    if any(review.resolve() == Path(a).resolve() for a in allow_from):
        say(f"not writing the review file {review}: --allow-from (privacy.allow_from) reads it (pass --review "
            "ANOTHER_FILE to get a new one)")
        return None
    return review


@contextmanager
def _environ_kept():
    """datasets' map with num_proc leaves os.environ replaced by a copy (datasets 5.2), and what
    holds the original object stops seeing changes: rich's consoles read COLUMNS from it. The
    original object (which also holds what datasets set there) is put back."""
    env = os.environ
    try:
        yield
    finally:
        os.environ = env


class _Stopwatch:
    """`with clock("stage"):` adds the stage's wall time to the card's `seconds`."""

    def __init__(self, seconds: dict):
        self.seconds = seconds

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = round(self.seconds.get(stage, 0) + time.perf_counter() - start, 2)


def _spec(config, options) -> DataSpec:
    base = config.model_dump() if isinstance(config, DataSpec) else dict(config or {})
    for key, value in options.items():
        base[key] = ({**base.get(key, {}), **value} if isinstance(value, dict) and isinstance(base.get(key), dict)
                     else value)
    return DataSpec.model_validate(base)


def _anonymizer(spec: DataSpec, processes: int):
    from tailor.data.privacy import Anonymizer

    # "drop" still needs a redacted copy of the record for rejects.jsonl: placeholders (drop_as's default).
    return Anonymizer.from_spec(spec.privacy, seed=spec.split.seed, processes=processes)


def _tokenizer(model: str):
    from tailor.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(model).path)

    # The chat template adds tokens around each message, and maybe a default system prompt; measure
    # both once instead of rendering every record: tokens ≈ contents + fixed + per_message × messages.
    def rendered(n_turns: int) -> int:
        turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": "x"} for i in range(n_turns)]
        text = tokenizer.apply_chat_template(turns, tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) - n_turns

    per_message = max(0, rendered(2) - rendered(1))
    fixed = max(0, rendered(1) - per_message)
    return tokenizer, (fixed, per_message)


# --- read ----------------------------------------------------------------------------------------


class _Rejects:
    """rejects.jsonl: every record that did not make it, with where it came from and why. The
    record's text is anonymized like the data; duplicates point at the copy that was kept."""

    def __init__(self, path: Path, anonymizer):
        self.path, self.anonymizer = path, anonymizer
        self.count = 0
        self.by_stage: Counter = Counter()
        self.pending: list[dict] = []

    def __enter__(self):
        self.file = self.path.open("w", encoding="utf-8")
        return self

    def add(self, source: str, line, stage: str, reason: str, record: str | None = None, **extra) -> None:
        self.count += 1
        self.by_stage[stage] += 1
        self.pending.append({"id": record_id(source, line), "source": source, "line": line, "stage": stage,
                             "reason": reason, **extra, **({"record": record} if record is not None else {})})
        if len(self.pending) >= BATCH:
            self.flush()

    def flush(self) -> None:
        rows, self.pending = self.pending, []
        with_text = [r for r in rows if "record" in r]
        if self.anonymizer is not None and with_text:
            texts = [_speakers_replaced(r["record"], self.anonymizer) for r in with_text]
            for r, (text, _) in zip(with_text, self.anonymizer.anonymize_batch(texts)):
                r["record"] = text
        self.file.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    def __exit__(self, *exc):
        self.flush()
        self.file.close()


def _source_labels(sources: list[SourceSpec]) -> list[str]:
    """What each input is called in the prepared data: its file or folder name, numbered where two
    inputs share one ("data", "data~2")."""
    labels: list[str] = []
    for src in sources:
        name = Path(os.path.abspath(src.path)).name or "input"
        label, n = name, 1
        while label in labels:
            n += 1
            label = f"{name}~{n}"
        labels.append(label)
    return labels


def _relative(source: str, root: Path, label: str) -> str:
    """A record's file as stored: the input's label, then the path inside it (posix style)."""
    try:
        inside = Path(source).relative_to(root)
    except ValueError:  # not under the input given (no reader does this): only its name, never the folders
        return f"{label}/{Path(source).name}"
    return label if inside == Path(".") else f"{label}/{inside.as_posix()}"


# A "name": "…" member in a record's JSON text: a chat message's speaker (the whole value is replaced).
_NAME_MEMBER = re.compile(r'("name"\s*:\s*")((?:[^"\\]|\\.)*)(")')


def _speakers_replaced(record: str, anonymizer) -> str:
    """A rejected record's text (as read, or as JSON) with every "name" member's value replaced as
    a speaker's name (Anonymizer.find_speaker): the text may not parse (it is what failed to
    read), so the members are found by their shape."""

    def replaced(m: re.Match) -> str:
        try:
            value = json.loads(f'"{m[2]}"')
        except ValueError:
            value = m[2]
        new, _ = anonymizer.replace(value, anonymizer.find_speaker(value))
        return m[1] + json.dumps(new, ensure_ascii=False)[1:-1] + m[3]

    return _NAME_MEMBER.sub(replaced, record) if '"name"' in record else record


def _read(sources: list[SourceSpec], labels: list[str], work: Path, rejects: _Rejects, on_error: str):
    from tailor.data.formats import Reject, read_source

    problems: list[str] = []

    def records():
        for src, label in zip(sources, labels):
            root = Path(src.path)
            for item in read_source(**source_options(src)):
                if isinstance(item, Reject):
                    if on_error == "fail":  # (the error names the files as given)
                        problems.append(f"{record_id(item.source, item.line)}: {item.reason}")
                        if len(problems) >= MAX_FAIL_PROBLEMS:
                            return
                        continue
                    rejects.add(_relative(item.source, root, label), item.line, "read", item.reason, item.record)
                else:
                    item.meta["source"] = _relative(item.meta["source"], root, label)
                    yield to_row(item)

    ds = _write_arrow(records(), work / "cache" / "read.arrow")
    if problems:
        raise DataError(problems + ["(data.on_error is fail; set it to skip to write bad records to rejects.jsonl "
                                    "and go on)"])
    return ds


def _write_arrow(rows, path: Path):
    """Stream rows into an Arrow file in batches and open it memory-mapped as a Dataset."""
    import pyarrow as pa
    from datasets import Dataset

    schema = features().arrow_schema
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        batch = []
        for row in rows:
            batch.append(row)
            if len(batch) == 10 * BATCH:
                writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=schema))
                batch = []
        if batch:
            writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=schema))
    return Dataset.from_file(str(path))


# --- clean and measure (worker processes) ----------------------------------------------------------


class _Measure:
    """Clean every text of a batch of records and compute what the later stages need: token count,
    turns, language, exact and prompt keys, MinHash signature, and why the record is filtered."""

    def __init__(self, spec: DataSpec, tokenizer, overhead: tuple[int, int]):
        self.clean, self.dedup = spec.clean, spec.dedup
        self.tokenizer, self.overhead = tokenizer, overhead

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        c = self.clean
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        examples, all_texts = [], []
        for row in rows:
            ex = from_row(row)
            texts = [clean_text(t, c.unicode, c.fix_encoding, c.strip_html) for t in texts_of(ex)]
            examples.append(with_texts(ex, texts))
            all_texts.append(texts)
        flat = [t for texts in all_texts for t in texts]
        # The Rust tokenizer directly: transformers' wrapper costs more than the tokenization itself.
        encoded = self.tokenizer.backend_tokenizer.encode_batch(flat, add_special_tokens=False) if flat else []
        lengths = iter(len(e.ids) for e in encoded)

        out: dict[str, list] = {k: [] for k in ("messages", "chosen", "rejected", "text", "n_tokens", "n_turns",
                                                "language", "exact", "prompt", "problem")}
        joined = []
        for ex, texts in zip(examples, all_texts):
            fixed, per_message = self.overhead
            n_tokens = (sum(next(lengths) for _ in texts) + per_message * len(texts)
                        + (fixed if ex.kind != "text" else 0))
            body = "\n".join(texts)
            language = _language(body) if c.languages else None  # the card detects on a sample
            row = to_row(ex)
            for k in ("messages", "chosen", "rejected", "text"):
                out[k].append(row[k])
            out["n_tokens"].append(n_tokens)
            out["n_turns"].append(sum(m["role"] == "user" for m in ex.messages))
            out["language"].append(language)
            out["exact"].append(exact_key(texts))
            out["prompt"].append(_prompt_key(ex))
            out["problem"].append(self._problem(ex, n_tokens, language))
            joined.append(body)
        out["signature"] = list(signatures(joined, self.dedup.ngram, self.dedup.num_perm))
        return out

    def _problem(self, ex, n_tokens: int, language: str) -> str | None:
        problem = check_example(ex)  # cleaning can empty a turn that held only markup or control characters
        if problem:
            return f"after cleaning: {problem}"
        if n_tokens < self.clean.min_tokens:
            return f"too short: {n_tokens} tokens < clean.min_tokens={self.clean.min_tokens}"
        if self.clean.max_tokens and n_tokens > self.clean.max_tokens:
            return f"too long: {n_tokens} tokens > clean.max_tokens={self.clean.max_tokens}"
        if self.clean.languages and language not in self.clean.languages:
            return f"language '{language}' not in clean.languages={self.clean.languages}"
        return None


def _language(text: str) -> str:
    import py3langid

    return py3langid.classify(text[:2000])[0] if text.strip() else ""


# --- filter and de-duplicate (in order: the first copy is the one kept) ---------------------------------


def _filter_and_exact(ds, spec: DataSpec, rejects: _Rejects, stats: dict, reason: str,
                      among: list[int] | None = None) -> list[int]:
    """The records kept (of `among`, default all): those with a problem are filtered out, then every
    exact copy of an earlier record goes (with `reason`)."""
    kept: list[int] = []
    first: dict[str, int] = {}
    ids = column(ds, "id")
    considered = None if among is None else set(among)
    for start, part in _chunks(ds, ["problem", "exact", "source", "line"]):
        for j, (problem, key) in enumerate(zip(part["problem"], part["exact"])):
            i = start + j
            if considered is not None and i not in considered:
                continue
            source, line = part["source"][j], part["line"][j]
            if problem:
                stats["filter_reasons"][problem.split(":")[0]] += 1
                rejects.add(source, line, "filter", problem, json.dumps(_record_json(ds[i]), ensure_ascii=False))
            elif spec.dedup.exact and key in first:
                stats["duplicates"]["exact"] += 1
                rejects.add(source, line, "duplicate", reason, duplicate_of=ids[first[key]])
            else:
                first.setdefault(key, i)
                kept.append(i)
    return kept


def _near(ds, rows: list[int], spec: DataSpec, rejects: _Rejects, stats: dict) -> tuple[list[int], dict[int, int]]:
    """Of `rows`, the records kept, and the first of each record's near-duplicate cluster
    ({record: first}). Each record is compared with those before it; only records that share an
    LSH band with another are indexed at all. With dedup.near off, clusters are still found: they
    keep to one split."""
    near = NearDuplicates(spec.dedup.threshold, spec.dedup.num_perm)
    alive = np.zeros(len(ds), bool)
    alive[rows] = True
    survivors, keys = [], []
    for start, part in _chunks(ds, ["signature"]):
        idx = np.flatnonzero(alive[start:start + len(part["signature"])])
        survivors.append(start + idx)
        keys.append(near.band_keys(part["signature"][idx]))
    survivors = np.concatenate(survivors) if survivors else np.zeros(0, np.int64)
    keys = np.concatenate(keys) if keys else np.zeros((0, near.bands), np.uint64)
    candidate = sharing_a_band(keys)
    keys_of = dict(zip(survivors[candidate].tolist(), keys[candidate]))

    cluster: dict[int, int] = {}
    members: dict[int, list[int]] = {}
    ids = column(ds, "id")
    for start, part in _chunks(ds, ["signature", "source", "line"]):
        for j, sig in enumerate(part["signature"]):
            i = start + j
            if i not in keys_of:
                continue
            rep = near.add(i, sig, keys_of[i])
            if rep is not None:
                cluster[i] = rep
                members.setdefault(rep, [rep]).append(i)
                if spec.dedup.near:
                    alive[i] = False
                    stats["duplicates"]["near"] += 1
                    rejects.add(part["source"][j], part["line"][j], "duplicate",
                                f"near duplicate (similarity ≥ {spec.dedup.threshold})", duplicate_of=ids[rep])
    biggest = sorted(members.values(), key=len, reverse=True)[:3]
    stats["cluster_examples"] = [{"size": len(m), "ids": [ids[i] for i in m[:4]],
                                  "texts": [_preview(ds[i]) for i in m[:3]]}
                                 for m in biggest]
    return np.flatnonzero(alive).tolist(), cluster


def _chunks(ds, names: list[str], size: int = 20 * BATCH):
    """(start, {column: values}) over `ds` in chunks: Python lists, and signatures as one numpy
    matrix per chunk, so memory stays flat however many records there are."""
    table = ds.with_format("arrow")
    for start in range(0, len(ds), size):
        part = table[start:start + size]
        out = {}
        for name in names:
            col = part.column(name)
            if name == "signature":
                flat = col.combine_chunks().flatten().to_numpy()
                out[name] = flat.reshape(len(col), -1) if len(col) else flat
            else:
                out[name] = col.to_pylist()
        yield start, out


def _record_json(row: dict) -> dict:
    ex = from_row(row)
    if ex.kind == "text":
        return {"text": ex.text}
    out = {"messages": ex.messages}
    if ex.kind == "preference":
        out |= {"chosen": ex.chosen, "rejected": ex.rejected}
    return out


def _preview(row: dict, width: int = 160) -> str:
    text = " / ".join(texts_of(from_row(row)))
    return text if len(text) <= width else text[:width - 1] + "…"


# --- anonymize -------------------------------------------------------------------------------------


def _prompt_key(ex) -> str | None:
    """What the split keeps in one split: a hash of the normalized prompt."""
    prompt = prompt_of(ex)
    return hashlib.blake2b(normalized(prompt).encode(), digest_size=16).hexdigest() if prompt else None


def _anonymize(ds, anonymizer, privacy, rejects: _Rejects, work: Path, dedup, found_values: Counter):
    """Replace personal data in every text of the kept records. Returns the records, those to drop
    ({index: reason}: every record with personal data under privacy.strategy drop; else those with
    an answer left as nothing but replaced values, unless privacy.keep_emptied_answers) and the
    card's privacy counts; adds the NER values found to `found_values` (for the owner's review).
    Writes pii_audit.jsonl: per record, which entity types were replaced and how often.
    A changed record's prompt key, exact key and MinHash signature are computed again: prompts that
    differed only in a name ("I'm Priya" / "I'm Tom") are the same prompt once anonymized, and the
    duplicate passes, the split and its leakage check must see what the model will see."""
    from tailor.data.privacy import nothing_left
    from tailor.data.privacy.review import review_key

    drop = privacy.strategy == "drop"
    counts_per_record: list[dict] = []
    emptied_per_record: list[int] = []  # answers left as nothing but replaced values
    answers = {"answers": 0, "answers_changed": 0}

    def redact(batch: dict[str, list]) -> dict[str, list]:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        examples = [from_row(r) for r in rows]
        texts = [texts_of(ex) for ex in examples]
        out = {k: [] for k in ("messages", "chosen", "rejected", "text", "prompt", "exact", "signature")}
        changed = []
        for i, (ex, found) in enumerate(zip(examples, anonymizer.find_records(texts))):
            counts: Counter = Counter()
            new, emptied = [], 0
            for text, spans, trained in zip(texts[i], found, _trained_answers(ex)):
                new_text, n = anonymizer.replace(text, spans)
                new.append(new_text)
                counts.update(n)
                found_values.update(k for k in (review_key(s.entity, text[s.start:s.end]) for s in spans) if k)
                if trained:
                    answers["answers"] += 1
                    answers["answers_changed"] += bool(spans)
                    emptied += nothing_left(text, spans)
            redacted = _speakers_anonymized(with_texts(ex, new), anonymizer, counts, found_values)
            counts_per_record.append(dict(counts))
            emptied_per_record.append(emptied)
            row = to_row(redacted)
            for k in ("messages", "chosen", "rejected", "text"):
                out[k].append(row[k])
            same = new == texts[i]  # (speaker names are in no key: the model never sees them)
            out["prompt"].append(batch["prompt"][i] if same else _prompt_key(redacted))
            out["exact"].append(batch["exact"][i] if same else exact_key(new))
            out["signature"].append(np.asarray(batch["signature"][i], np.uint32))
            if not same:
                changed.append((i, "\n".join(new)))
        if changed:
            fresh = signatures([body for _, body in changed], dedup.ngram, dedup.num_perm)
            for (i, _), sig in zip(changed, fresh):
                out["signature"][i] = sig
        return out

    ds = ds.map(redact, batched=True, batch_size=BATCH, new_fingerprint="anonymized", desc="anonymizing",
                features=ds.features)
    ids = column(ds, "id")
    entities: Counter = Counter()
    with (work / "pii_audit.jsonl").open("w", encoding="utf-8") as audit:
        for i, counts in enumerate(counts_per_record):
            if counts:
                entities.update(counts)
                audit.write(json.dumps({"id": ids[i], "entities": dict(sorted(counts.items())),
                                        "action": "dropped" if drop else "replaced"}) + "\n")
    # rejects.jsonl gets the records as anonymized here (what NER found in each turn is gone for sure),
    # and anonymized once more on the way, like every reject; under "drop" they are still as read.
    dropped = _privacy_rejects(ds, counts_per_record, emptied_per_record, privacy, rejects)
    pii = {"strategy": "drop" if drop else anonymizer.strategy, "ner": privacy.ner,
           "records_with_pii": sum(bool(c) for c in counts_per_record), "entities": dict(entities.most_common()),
           **answers, "answers_emptied": sum(emptied_per_record),
           "records_emptied": sum(bool(e) for e in emptied_per_record),
           "emptied_kept": privacy.keep_emptied_answers and not drop}
    return ds, dropped, pii


def _speakers_anonymized(ex, anonymizer, counts: Counter, found_values: Counter):
    """The record with each message's `name` (its speaker: "Priya Nair", "user_4821") replaced like
    a name in the text (Anonymizer.find_speaker), counted as a PERSON; the same pseudonym as the
    same name elsewhere. Training never renders the field, so no key above needs it again."""
    from tailor.data.privacy.review import review_key

    def renamed(messages):
        if messages is None:
            return None
        out = []
        for m in messages:
            if m.get("name"):
                spans = anonymizer.find_speaker(m["name"])
                name, n = anonymizer.replace(m["name"], spans)
                counts.update(n)
                found_values.update(k for k in (review_key(s.entity, m["name"][s.start:s.end]) for s in spans) if k)
                m = {**m, "name": name}
            out.append(m)
        return out

    if ex.kind == "text":
        return ex
    return replace(ex, messages=renamed(ex.messages), chosen=renamed(ex.chosen), rejected=renamed(ex.rejected))


DROPPED_FOR_PII = "personal data (privacy.strategy: drop)"
EMPTIED_ANSWER = "answer was only personal data (privacy.keep_emptied_answers: false)"


def _privacy_rejects(ds, counts_per_record: list[dict], emptied_per_record: list[int], privacy,
                     rejects: _Rejects) -> dict[int, str]:
    """The records the privacy stage drops, {index: the card's filter reason}, each written to
    rejects.jsonl (anonymized, like every reject) with what happened and what to do."""
    dropped = {}
    for i, (counts, emptied) in enumerate(zip(counts_per_record, emptied_per_record)):
        found = ", ".join(f"{k} ×{v}" for k, v in sorted(counts.items()))
        if privacy.strategy == "drop" and counts:
            dropped[i], reason = DROPPED_FOR_PII, f"personal data ({found}); privacy.strategy is drop"
        elif emptied and not privacy.keep_emptied_answers:
            dropped[i] = EMPTIED_ANSWER
            reason = (f"{emptied} answer(s) became nothing but placeholders once anonymized ({found}): a model "
                      "trained on it learns to answer '<PERSON>'. If the values are public (names of public "
                      "figures, titles, brands), add them to privacy.allow or prepare again with --allow-from "
                      "the review file; for public-knowledge data set privacy.ner: false; to keep such records "
                      "anyway set privacy.keep_emptied_answers: true")
        else:
            continue
        row = ds[i]
        rejects.add(row["source"], row["line"], "privacy", reason, json.dumps(_record_json(row), ensure_ascii=False))
    return dropped


def _trained_answers(ex) -> list[bool]:
    """For each text of a record (texts_of order): whether it is an answer the model is trained on
    (an assistant turn without weight 0)."""
    if ex.kind == "text":
        return [False]
    turns = ex.messages + (ex.chosen or []) + (ex.rejected or [])
    return [m["role"] == "assistant" and m.get("weight", 1) != 0 for m in turns]


# --- split and write -------------------------------------------------------------------------------


def _split(ds, clusters: list[int | None], spec: DataSpec) -> list[str]:
    groups = group_records(column(ds, "prompt"), clusters)
    strata = column(ds, "task") if spec.split.stratify else [None] * len(ds)
    return assign_splits(groups, strata, column(ds, "exact"), spec.split.validation, spec.split.test, spec.split.seed)


def _write_splits(ds, split_of: list[str], work: Path) -> None:
    schema = features()
    extra = [c for c in ds.column_names if c not in schema]
    for name in SPLITS:
        idx = [i for i, s in enumerate(split_of) if s == name]
        ds.select(idx).remove_columns(extra).cast(schema).save_to_disk(str(work / name))


def _near_leaks(ds, split_of: list[str], spec: DataSpec) -> int:
    """Validation and test records that resemble a training record: checked afresh against an index
    of the train split alone, whatever the de-duplication settings were. Only records that share an
    LSH band with the other side can match, so only those are indexed and queried."""
    index = NearDuplicates(spec.dedup.threshold, spec.dedup.num_perm)
    train = np.array([s == "train" for s in split_of], bool)
    keys = np.concatenate([index.band_keys(part["signature"]) for _, part in _chunks(ds, ["signature"])]
                          or [np.zeros((0, index.bands), np.uint64)])
    held_out = ~train & sharing_a_band(keys, keys[train])
    indexed = train & sharing_a_band(keys, keys[held_out])
    leaks = 0
    for start, part in _chunks(ds, ["signature"]):
        for j, sig in enumerate(part["signature"]):
            if indexed[start + j]:
                index.insert(start + j, sig, keys[start + j])
    for start, part in _chunks(ds, ["signature"]):
        for j, sig in enumerate(part["signature"]):
            if held_out[start + j] and index.similar(sig, keys[start + j]):
                leaks += 1
    return leaks
