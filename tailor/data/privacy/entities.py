"""The personal-data types Anonymizer knows: which recognizer finds each, which are on by default,
and the placeholder each becomes."""

# Found by spaCy's NER (through Presidio's SpacyRecognizer); need ner=True and the model.
NER_ENTITIES = ("PERSON", "LOCATION", "ORGANIZATION", "NRP")

# National id numbers: one placeholder, <ID_NUMBER>, for all of them.
ID_ENTITIES = (
    "US_SSN", "US_ITIN", "UK_NHS", "UK_NINO", "ES_NIF", "ES_NIE", "IT_FISCAL_CODE", "SG_NRIC_FIN",
    "FI_PERSONAL_IDENTITY_CODE", "SE_PERSONNUMMER", "KR_RRN", "PL_PESEL", "AU_TFN", "AU_MEDICARE",
    "IN_AADHAAR", "CA_SIN",
)

# Pattern-based types: Presidio's recognizer, and a regex a text must match for any of that
# recognizer's patterns to match (None: no cheap test). The batch path's pre-filter
# (finding._prefilter) skips the recognizer when it does not. Each test is a part that every one
# of the recognizer's patterns contains (read off Presidio's regexes, noted beside each), written
# looser than the pattern: \d for [0-9], any letter for [A-Z] (Presidio matches ignoring case,
# and then [A-Z] also matches 'ſ' and 'K'). So a skip never changes what is found. anonymize()
# runs every recognizer on every text and is the oracle the tests compare against. Phones are the
# costly one (libphonenumber scans the text once per region; docs/performance.md): a valid number
# has at least 4 digits (libphonenumber's metadata: the shortest anywhere, in Luxembourg and
# Germany, have 4), so "9 euros" or "at 9:30" skip it.
_DIGIT, _FOUR_DIGITS, _AT = r"\d", r"\d(?:\D*\d){3}", "@"
_FOUR_IN_A_ROW, _SIX_IN_A_ROW, _SEVEN_IN_A_ROW = r"\d{4}", r"\d{6}", r"\d{7}"
_SIXTEEN_ALNUM = r"[^\W_]{16}"

_PATTERN_RECOGNIZERS = {
    "EMAIL_ADDRESS": ("EmailRecognizer", _AT),
    "PHONE_NUMBER": ("PhoneRecognizer", _FOUR_DIGITS),
    "CREDIT_CARD": ("CreditCardRecognizer", _FOUR_IN_A_ROW),  # a first group of 4 digits (ours too)
    "IBAN_CODE": ("IbanRecognizer", r"[^\W\d_]{2}\d{2}"),  # country code and check digits: DE89
    "IP_ADDRESS": ("IpRecognizer", r"\d\.\d|:"),  # IPv4 octets around a dot; every IPv6 form has ':'
    "URL": ("UrlRecognizer", None),
    "DATE_TIME": ("DateRecognizer", None),
    "US_SSN": ("UsSsnRecognizer", r"\d{2}[- .]?\d{4}"),  # in ddd-dd-dddd, ddddd-dddd, ddd-dddddd, d{9}
    "US_ITIN": ("UsItinRecognizer", _FOUR_IN_A_ROW),  # every form ends in 4 digits
    "UK_NHS": ("NhsRecognizer", _FOUR_IN_A_ROW),  # ddd ddd dddd
    "UK_NINO": ("UkNinoRecognizer", r"\d{2} ?\d{2}"),  # AB 12 34 56 C
    "ES_NIF": ("EsNifRecognizer", _SEVEN_IN_A_ROW),  # d?ddddddd-L
    "ES_NIE": ("EsNieRecognizer", _SEVEN_IN_A_ROW),  # X?d?ddddddd-L
    # "omocodia" may turn every digit into a letter, but a code is 16 letters and digits in a row
    "IT_FISCAL_CODE": ("ItFiscalCodeRecognizer", _SIXTEEN_ALNUM),
    "SG_NRIC_FIN": ("SgFinRecognizer", _SEVEN_IN_A_ROW),  # Sddddddd L
    "FI_PERSONAL_IDENTITY_CODE": ("FiPersonalIdentityCodeRecognizer", _SIX_IN_A_ROW),  # dddddd-dddC
    "SE_PERSONNUMMER": ("SePersonnummerRecognizer", _DIGIT),
    "KR_RRN": ("KrRrnRecognizer", _DIGIT),
    "PL_PESEL": ("PlPeselRecognizer", _DIGIT),
    "AU_TFN": ("AuTfnRecognizer", _DIGIT),
    "AU_MEDICARE": ("AuMedicareRecognizer", _DIGIT),
    "IN_AADHAAR": ("InAadhaarRecognizer", _DIGIT),
    "CA_SIN": ("CaSinRecognizer", _DIGIT),
}
ENTITIES = NER_ENTITIES + tuple(_PATTERN_RECOGNIZERS)

# What is on by default, and why the rest is not:
# - the national ids here have a check letter or a shape no order or phone number has (letters
#   around digits, a date with a century sign), or are the common US and UK ones (SSN and ITIN
#   with their separators, NHS with its mod-11 check); SE_PERSONNUMMER, KR_RRN, PL_PESEL, AU_TFN,
#   AU_MEDICARE, IN_AADHAAR and CA_SIN are bare runs of 9-13 digits (some a date) with a 1-in-10
#   checksum or none (KR_RRN), which date-stamped order numbers and tracking numbers pass often
#   enough to be noise in data that is not from those countries (turn them on for data that is);
# - LOCATION: in support chat, places are mostly cities and countries a question is about
#   ("do you ship to Norway?"), which identify nobody and carry the task; en_core_web_sm also tags
#   product names as places. Turn it on for data with postal addresses;
# - DATE_TIME: dates identify nobody on their own, and Presidio's date patterns fire on digit
#   groups (order numbers, versions); ORGANIZATION, NRP, URL: mostly the business's own names
#   and links.
DEFAULT_ENTITIES = (
    "PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS",
    "US_SSN", "US_ITIN", "UK_NHS", "UK_NINO", "ES_NIF", "ES_NIE", "IT_FISCAL_CODE", "SG_NRIC_FIN",
    "FI_PERSONAL_IDENTITY_CODE",
)

TAGS = {
    "PERSON": "<PERSON>",
    "EMAIL_ADDRESS": "<EMAIL>",
    "PHONE_NUMBER": "<PHONE>",
    "CREDIT_CARD": "<CREDIT_CARD>",
    "IBAN_CODE": "<IBAN>",
    "IP_ADDRESS": "<IP_ADDRESS>",
    "URL": "<URL>",
    "DATE_TIME": "<DATE>",
    "LOCATION": "<LOCATION>",
    "ORGANIZATION": "<ORGANIZATION>",
    "NRP": "<NRP>",  # nationality, religious or political group
    **{entity: "<ID_NUMBER>" for entity in ID_ENTITIES},
}
