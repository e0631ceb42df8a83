"""BLEU two ways.

- sacreBLEU's default (13a tokenization, cased) on detokenized text, with the signature that
  says exactly how it was computed: the number to compare across papers that publish one.
- "The papers' metric" for Multi30k: BLEU on lower-cased, Moses-tokenized references (the
  dataset's tok/*.lc.norm.tok.* files). Hypotheses get the same treatment here, by
  `moses_tokenize`, a short re-implementation of the three Moses scripts for English
  (lowercase.perl, normalize-punctuation.perl, tokenizer.perl with its default escaping);
  the benchmark reports how many reference lines it reproduces from the raw text.
"""

from __future__ import annotations

import regex

# tokenizer.perl keeps the period after these (English nonbreaking_prefix.en, the common ones)
_NONBREAKING = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "mt", "vs", "etc", "inc", "ltd", "co",
                "no", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec"}
_ESCAPES = [("&", "&amp;"), ("|", "&#124;"), ("<", "&lt;"), (">", "&gt;"), ("'", "&apos;"),
            ('"', "&quot;"), ("[", "&#91;"), ("]", "&#93;")]


def normalize_punctuation(text: str) -> str:
    """The parts of normalize-punctuation.perl that matter for English captions."""
    for a, b in (("\r", ""), ("„", '"'), ("“", '"'), ("”", '"'), ("«", '"'), ("»", '"'), ("``", '"'),
                 ("''", '"'), ("‘", "'"), ("’", "'"), ("´", "'"), ("`", "'"), ("–", "-"), ("—", " - "),
                 ("…", "..."), ("\u00a0", " ")):
        text = text.replace(a, b)
    text = regex.sub(r"\(", " (", text)
    text = regex.sub(r"\)", ") ", text)
    text = regex.sub(r" +", " ", text)
    text = regex.sub(r"\) ([.!:?;,])", r")\1", text)
    text = regex.sub(r"\( ", "(", text)
    text = regex.sub(r" \)", ")", text)
    text = regex.sub(r" :", ":", text)
    text = regex.sub(r" ;", ";", text)
    text = regex.sub(r'"([,.]+)', r'\1"', text)  # English style: the period goes inside quotes
    return text.strip()


def moses_tokenize(text: str, lowercase: bool = True) -> str:
    """Lower-case, normalize and tokenize one English line as the Moses scripts do, e.g.
    "A man's hat, 3,000 dollars." -> "a man &apos;s hat , 3,000 dollars ." """
    if lowercase:
        text = text.lower()
    text = normalize_punctuation(text)
    text = regex.sub(r"\s+", " ", f" {text} ")
    text = regex.sub(r"[\x00-\x1f]", "", text)
    text = regex.sub(r"([^\p{L}\p{N}\s\.'`,\-])", r" \1 ", text)  # split off special characters
    text = regex.sub(r"\.([\.]+)", r" DOTMULTI\1", text)  # keep "..." together
    while regex.search(r"DOTMULTI\.", text):
        text = regex.sub(r"DOTMULTI\.([^\.])", r"DOTDOTMULTI \1", text)
        text = regex.sub(r"DOTMULTI\.", "DOTDOTMULTI", text)
    text = regex.sub(r"([^\p{N}]),", r"\1 , ", text)  # commas, unless inside a number
    text = regex.sub(r",([^\p{N}])", r" , \1", text)
    text = regex.sub(r"([\p{N}]),$", r"\1 ,", text)
    text = regex.sub(r"([^\p{L}])'([^\p{L}])", r"\1 ' \2", text)  # English apostrophes
    text = regex.sub(r"([^\p{L}\p{N}])'([\p{L}])", r"\1 ' \2", text)
    text = regex.sub(r"([\p{L}])'([^\p{L}])", r"\1 ' \2", text)
    text = regex.sub(r"([\p{L}])'([\p{L}])", r"\1 '\2", text)
    text = regex.sub(r"([\p{N}])'([s])", r"\1 '\2", text)
    words = text.split()
    for i, word in enumerate(words):  # a final period is its own token, except after an abbreviation
        m = regex.fullmatch(r"(\S+)\.", word)
        if not m:
            continue
        pre = m.group(1)
        keep = (("." in pre and regex.search(r"\p{L}", pre)) or pre in _NONBREAKING
                or (i < len(words) - 1 and regex.match(r"^[\p{Ll}]", words[i + 1])))
        if not keep:
            words[i] = pre + " ."
    text = " ".join(words)
    text = regex.sub(r"DOTDOTMULTI", "DOTMULTI.", text)
    while "DOTMULTI" in text:
        text = text.replace("DOTDOTMULTI", "DOTMULTI.").replace("DOTMULTI", ".")
    for a, b in _ESCAPES:
        text = text.replace(a, b)
    return regex.sub(r" +", " ", text).strip()


def sacre_bleu(hyps: list[str], refs: list[str]) -> tuple[float, str]:
    """Corpus BLEU with sacreBLEU's defaults (13a, cased); returns (score, signature)."""
    from sacrebleu.metrics import BLEU

    metric = BLEU()
    score = metric.corpus_score(hyps, [refs])
    return score.score, str(metric.get_signature())


def tokenized_bleu(hyps: list[str], tok_refs: list[str]) -> tuple[float, str]:
    """The papers' metric: hypotheses Moses-tokenized and lower-cased, scored against the
    already tokenized, lower-cased references with no further tokenization."""
    from sacrebleu.metrics import BLEU

    hyps = [moses_tokenize(h) for h in hyps]  # tokenized on purpose: force, no warning
    metric = BLEU(tokenize="none", lowercase=True, force=True)
    score = metric.corpus_score(hyps, [[r.strip() for r in tok_refs]])
    return score.score, str(metric.get_signature())
