"""ISO 639-1 language codes, and the English names clients send instead of them.

The OpenAI audio API takes `language` as an ISO 639-1 code (`en`, `de`). Clients written for
Whisper's own command line send names (`english`, `German`), as Whisper accepts both. Both are
taken here: a code (any case) or an English name (any case, Whisper's aliases such as
`castilian` included) becomes the code; anything else is refused, so an unknown language is
never reported back as if it had been used.
"""

from typing import Final

__all__ = ["ISO_639_1", "normalize_language"]

ISO_639_1: Final[dict[str, str]] = {
    "aa": "afar", "ab": "abkhazian", "ae": "avestan", "af": "afrikaans", "ak": "akan",
    "am": "amharic", "an": "aragonese", "ar": "arabic", "as": "assamese", "av": "avaric",
    "ay": "aymara", "az": "azerbaijani", "ba": "bashkir", "be": "belarusian", "bg": "bulgarian",
    "bi": "bislama", "bm": "bambara", "bn": "bengali", "bo": "tibetan", "br": "breton",
    "bs": "bosnian", "ca": "catalan", "ce": "chechen", "ch": "chamorro", "co": "corsican",
    "cr": "cree", "cs": "czech", "cu": "church slavic", "cv": "chuvash", "cy": "welsh",
    "da": "danish", "de": "german", "dv": "divehi", "dz": "dzongkha", "ee": "ewe",
    "el": "greek", "en": "english", "eo": "esperanto", "es": "spanish", "et": "estonian",
    "eu": "basque", "fa": "persian", "ff": "fulah", "fi": "finnish", "fj": "fijian",
    "fo": "faroese", "fr": "french", "fy": "western frisian", "ga": "irish", "gd": "gaelic",
    "gl": "galician", "gn": "guarani", "gu": "gujarati", "gv": "manx", "ha": "hausa",
    "he": "hebrew", "hi": "hindi", "ho": "hiri motu", "hr": "croatian", "ht": "haitian creole",
    "hu": "hungarian", "hy": "armenian", "hz": "herero", "ia": "interlingua",
    "id": "indonesian", "ie": "interlingue", "ig": "igbo", "ii": "sichuan yi",
    "ik": "inupiaq", "io": "ido", "is": "icelandic", "it": "italian", "iu": "inuktitut",
    "ja": "japanese", "jv": "javanese", "ka": "georgian", "kg": "kongo", "ki": "kikuyu",
    "kj": "kuanyama", "kk": "kazakh", "kl": "kalaallisut", "km": "khmer", "kn": "kannada",
    "ko": "korean", "kr": "kanuri", "ks": "kashmiri", "ku": "kurdish", "kv": "komi",
    "kw": "cornish", "ky": "kyrgyz", "la": "latin", "lb": "luxembourgish", "lg": "ganda",
    "li": "limburgish", "ln": "lingala", "lo": "lao", "lt": "lithuanian", "lu": "luba-katanga",
    "lv": "latvian", "mg": "malagasy", "mh": "marshallese", "mi": "maori", "mk": "macedonian",
    "ml": "malayalam", "mn": "mongolian", "mr": "marathi", "ms": "malay", "mt": "maltese",
    "my": "myanmar", "na": "nauru", "nb": "norwegian bokmal", "nd": "north ndebele",
    "ne": "nepali", "ng": "ndonga", "nl": "dutch", "nn": "nynorsk", "no": "norwegian",
    "nr": "south ndebele", "nv": "navajo", "ny": "chichewa", "oc": "occitan", "oj": "ojibwa",
    "om": "oromo", "or": "oriya", "os": "ossetian", "pa": "punjabi", "pi": "pali",
    "pl": "polish", "ps": "pashto", "pt": "portuguese", "qu": "quechua", "rm": "romansh",
    "rn": "rundi", "ro": "romanian", "ru": "russian", "rw": "kinyarwanda", "sa": "sanskrit",
    "sc": "sardinian", "sd": "sindhi", "se": "northern sami", "sg": "sango", "si": "sinhala",
    "sk": "slovak", "sl": "slovenian", "sm": "samoan", "sn": "shona", "so": "somali",
    "sq": "albanian", "sr": "serbian", "ss": "swati", "st": "southern sotho",
    "su": "sundanese", "sv": "swedish", "sw": "swahili", "ta": "tamil", "te": "telugu",
    "tg": "tajik", "th": "thai", "ti": "tigrinya", "tk": "turkmen", "tl": "tagalog",
    "tn": "tswana", "to": "tonga", "tr": "turkish", "ts": "tsonga", "tt": "tatar",
    "tw": "twi", "ty": "tahitian", "ug": "uyghur", "uk": "ukrainian", "ur": "urdu",
    "uz": "uzbek", "ve": "venda", "vi": "vietnamese", "vo": "volapuk", "wa": "walloon",
    "wo": "wolof", "xh": "xhosa", "yi": "yiddish", "yo": "yoruba", "za": "zhuang",
    "zh": "chinese", "zu": "zulu",
}  # fmt: skip
"""The 183 ISO 639-1 codes and an English name for each."""

_ALIASES: Final[dict[str, str]] = {
    # Whisper's own alternative names (whisper/tokenizer.py, TO_LANGUAGE_CODE)
    "burmese": "my", "valencian": "ca", "flemish": "nl", "haitian": "ht",
    "letzeburgesch": "lb", "pushto": "ps", "panjabi": "pa", "moldavian": "ro",
    "moldovan": "ro", "sinhalese": "si", "castilian": "es", "mandarin": "zh",
    # other common English names
    "farsi": "fa", "scottish gaelic": "gd", "greek, modern": "el", "kirghiz": "ky",
    "uighur": "ug", "norwegian nynorsk": "nn", "bokmal": "nb", "filipino": "tl",
    "slovene": "sl", "frisian": "fy", "gaelic, scottish": "gd",
}  # fmt: skip

_BY_NAME: Final[dict[str, str]] = {name: code for code, name in ISO_639_1.items()} | _ALIASES


def normalize_language(value: str) -> str:
    """The ISO 639-1 code that `value` (a code or an English name, any case) stands for.

    Raises:
        ValueError: `value` is neither; the message says what is accepted.
    """
    key = " ".join(value.strip().lower().split())
    if key in ISO_639_1:
        return key
    if key in _BY_NAME:
        return _BY_NAME[key]
    raise ValueError(
        f"unknown language {value!r}: give an ISO 639-1 code (e.g. 'en', 'de') or an "
        "English language name (e.g. 'english')"
    )
