"""Built-in offline demo corpora: stand-ins for OpenWebText, WMT14 De→En and XSum.

Nothing here downloads anything. Every corpus is English-like text over a small built-in lexicon, drawn
deterministically from a seed, with moderate entropy so that a tiny model learns it on a CPU in minutes.

* **LM** (for OpenWebText): documents sampled from a `Grammar`, a hidden Markov model (weighted finite
  automaton) whose hidden states are sentence-template slots (determiner, adjective, noun, verb, ...).
  `Grammar.log_prob` is the *exact* likelihood of a word sequence (forward algorithm), so generated text
  can be scored against the true distribution (`oracle_perplexity`); `Grammar.log_prob_stream` scores a
  stream of documents packed with no separator (lm rows packed across documents).
* **Translation** (for WMT14 De→En): English sentences from a fixed grammar; the source is the English
  mapped word by word through an invented pseudo-German lexicon and reordered (verbs last, adjectives after
  their noun). The map is invertible: `translate_source_to_target` recovers the target exactly.
* **Summarisation** (for XSum): short documents about a main person; the summary follows a fixed rule
  spelled out in `summarize_document`, which recovers it exactly from the document.

Words are lowercase; "." is a word of its own. `words_to_text` renders them as prose (sentence starts and
names capitalised) and `text_to_words` reads prose back.
"""

from __future__ import annotations

import bisect
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

import numpy as np

from elf.errors import ElfError

# ---------------------------------------------------------------------------------------------------------
# Lexicon. Each class maps an English word to its invented German counterpart (one German form per English
# form; names stay as they are). Ambiguous words sit in two classes on purpose, so that the hidden state of
# a word is not always known from the word: light/cold/green (adjective or noun), plays/drinks/walks/waves
# (noun or verb), outside/around (preposition or adverb).
# ---------------------------------------------------------------------------------------------------------

_DETS = {
    "the": "der", "a": "ein", "this": "dieses", "that": "jenes", "every": "jedes", "my": "mein",
    "your": "dein", "his": "sein", "her": "ihr", "our": "unser", "their": "deren",
}
_ADJS = {
    "big": "gross", "small": "klein", "old": "alt", "young": "jung", "red": "rot", "blue": "blau",
    "green": "gruen", "yellow": "gelb", "happy": "froh", "sad": "traurig", "quiet": "leise", "loud": "laut",
    "tall": "lang", "short": "kurz", "little": "winzig", "new": "neu", "warm": "warm", "cold": "kalt",
    "light": "licht", "dark": "dunkel", "bright": "hell", "heavy": "schwer", "soft": "weich", "hard": "hart",
    "clean": "sauber", "dirty": "schmutzig", "kind": "freundlich", "brave": "mutig", "clever": "klug",
    "lazy": "faul", "busy": "fleissig", "strange": "seltsam",
}
_NOUNS = {
    "dog": "hund", "cat": "katze", "bird": "vogel", "fish": "fisch", "horse": "pferd", "cow": "kuh",
    "mouse": "maus", "fox": "fuchs", "bear": "baer", "child": "kind", "teacher": "lehrer", "doctor": "arzt",
    "farmer": "bauer", "baker": "baecker", "king": "koenig", "queen": "koenigin", "friend": "freund",
    "neighbour": "nachbar", "student": "schueler", "girl": "maedchen", "boy": "junge", "man": "mann",
    "woman": "frau", "ball": "ball", "book": "buch", "box": "kiste", "cup": "tasse", "key": "schluessel",
    "door": "tuer", "window": "fenster", "table": "tisch", "chair": "stuhl", "bed": "bett", "house": "haus",
    "garden": "garten", "park": "park", "river": "fluss", "lake": "see", "hill": "huegel", "tree": "baum",
    "flower": "blume", "apple": "apfel", "bread": "brot", "cake": "kuchen", "letter": "brief", "song": "lied",
    "picture": "bild", "car": "auto", "boat": "boot", "train": "zug", "bike": "rad", "road": "strasse",
    "bridge": "bruecke", "city": "stadt", "village": "dorf", "school": "schule", "shop": "laden",
    "market": "markt", "kitchen": "kueche", "hat": "hut",
    "light": "licht", "cold": "kalt", "green": "gruen",
    "plays": "spielt", "drinks": "trinkt", "walks": "wandert", "waves": "winkt",
}
_VERBS = {
    "sees": "sieht", "likes": "mag", "finds": "findet", "takes": "nimmt", "makes": "macht", "wants": "will",
    "needs": "braucht", "loves": "liebt", "hates": "hasst", "helps": "hilft", "calls": "ruft",
    "follows": "folgt", "watches": "beobachtet", "visits": "besucht", "carries": "traegt",
    "opens": "oeffnet", "closes": "schliesst", "holds": "haelt", "keeps": "behaelt", "brings": "bringt",
    "buys": "kauft", "sells": "verkauft", "reads": "liest", "writes": "schreibt", "paints": "malt",
    "draws": "zeichnet", "cleans": "putzt", "builds": "baut", "breaks": "bricht", "moves": "bewegt",
    "pushes": "schiebt", "pulls": "zieht", "meets": "trifft", "leaves": "verlaesst", "eats": "isst",
    "hears": "hoert", "knows": "kennt", "asks": "fragt",
    "plays": "spielt", "drinks": "trinkt", "walks": "wandert", "waves": "winkt",
}
_PREPS = {
    "in": "in", "on": "auf", "under": "unter", "near": "nahe", "behind": "hinter", "with": "mit",
    "from": "von", "to": "zu", "at": "bei", "into": "ins", "over": "ueber", "by": "neben",
    "outside": "draussen", "around": "herum",
}
_ADVS = {
    "quickly": "schnell", "slowly": "langsam", "often": "oft", "never": "nie", "always": "immer",
    "today": "heute", "again": "wieder", "away": "weg", "here": "hier", "together": "zusammen",
    "outside": "draussen", "around": "herum",
}
NAMES: tuple[str, ...] = (
    "anna", "ben", "clara", "david", "emma", "felix", "greta", "hans", "ida", "jonas",
    "karl", "lena", "max", "nora", "otto", "paula", "rosa", "sam", "tom", "vera",
)
PERIOD = "."

#: The built-in lexicon: word class → words. `build_grammar` accepts a different one (e.g. a tiny one).
LEXICON: dict[str, tuple[str, ...]] = {
    "det": tuple(_DETS), "adj": tuple(_ADJS), "noun": tuple(_NOUNS), "name": NAMES,
    "verb": tuple(_VERBS), "prep": tuple(_PREPS), "adv": tuple(_ADVS),
}


def demo_lexicon(words_per_class: int | None = None) -> dict[str, tuple[str, ...]]:
    """The built-in lexicon, or the first `words_per_class` words of each class: a smaller language that a
    small model learns in fewer steps (the CPU demo's choice; every word keeps its German form)."""
    if words_per_class is None:
        return dict(LEXICON)
    if words_per_class < 1:
        raise ElfError(f"demo lexicon: words_per_class must be >= 1, got {words_per_class}")
    return {c: words[:words_per_class] for c, words in LEXICON.items()}


def _german_lexicon() -> dict[str, str]:
    """English → pseudo-German, checked to be a bijection (translation must be exactly invertible)."""
    table: dict[str, str] = {name: name for name in NAMES} | {PERIOD: PERIOD}
    for part in (_DETS, _ADJS, _NOUNS, _VERBS, _PREPS, _ADVS):
        for en, de in part.items():
            if table.setdefault(en, de) != de:
                raise RuntimeError(f"demo lexicon: {en!r} has two German forms")
    if len(set(table.values())) != len(table):
        raise RuntimeError("demo lexicon: two English words share a German form")
    return table


TO_GERMAN: dict[str, str] = _german_lexicon()
FROM_GERMAN: dict[str, str] = {de: en for en, de in TO_GERMAN.items()}
_NAME_SET = frozenset(NAMES)
_DET_SET = frozenset(_DETS)
_ADJ_SET = frozenset(_ADJS)
_PREP_ADV_SET = frozenset(_PREPS) | frozenset(_ADVS)

#: Emission probability of a word outside the grammar's vocabulary, from whichever state emits it.
UNKNOWN_WORD_PROB = 1e-6
#: Seed of the fixed grammar behind the translation and summarisation corpora (the corpus seed only picks
#: the samples, so train/validation/test splits share one distribution).
DEMO_GRAMMAR_SEED = 0
GRAMMAR_FORMAT = "elf-demo-grammar/1"

# Independent random streams per corpus, so one seed gives unrelated lm / translation / summary samples.
_STREAM_LM, _STREAM_TRANSLATION, _STREAM_SUMMARY = 1, 2, 3

# ---------------------------------------------------------------------------------------------------------
# Text rendering
# ---------------------------------------------------------------------------------------------------------

_WORD_RE = re.compile(r"\.|[^\s.]+")


def words_to_text(words: Sequence[str]) -> str:
    """Prose from words: "." joins the word before it, sentence starts and names are capitalised.

    Words are expected lowercase, without whitespace or "." inside; then
    `text_to_words(words_to_text(w)) == w`.
    """
    out: list[str] = []
    sentence_start = True
    for word in words:
        if word == PERIOD:
            out.append(PERIOD)
            sentence_start = True
            continue
        if sentence_start or word in _NAME_SET:
            word = word[:1].upper() + word[1:]
        out.append(word if not out else " " + word)
        sentence_start = False
    return "".join(out)


def text_to_words(text: str) -> list[str]:
    """Lowercased words and "." tokens; any run of whitespace separates words."""
    return _WORD_RE.findall(text.lower())


def _split_sentences(words: Sequence[str]) -> list[list[str]]:
    """Sentences, each ending in "." (except a trailing fragment without one)."""
    sentences, current = [], []
    for word in words:
        current.append(word)
        if word == PERIOD:
            sentences.append(current)
            current = []
    if current:
        sentences.append(current)
    return sentences


# ---------------------------------------------------------------------------------------------------------
# The grammar
# ---------------------------------------------------------------------------------------------------------


def _pos(state: str) -> str:
    """Part of speech of a state name such as "OBJ_ADJ2@3" → "ADJ"."""
    return state.split("@")[0].split("_")[-1].rstrip("0123456789")


@dataclass(eq=False)
class Grammar:
    """A hidden Markov model over words with an explicit end-of-document event.

    A document is a path of hidden states s1..sT, each emitting one word, then END:
    P = start[s1] · emit[s1, w1] · Π trans[s(t-1), s(t)] · emit[s(t), w(t)] · end[sT].
    Every row of `trans` plus the matching `end` entry sums to 1, as do `start` and each row of `emit`.
    """

    states: list[str]
    vocab: list[str]
    start: np.ndarray  # (S,)
    trans: np.ndarray = field(repr=False)  # (S, S)
    end: np.ndarray = field(repr=False)  # (S,)
    emit: np.ndarray = field(repr=False)  # (S, V)

    def __post_init__(self) -> None:
        self.states, self.vocab = list(self.states), list(self.vocab)
        self.start, self.trans, self.end, self.emit = (
            np.asarray(a, dtype=np.float64) for a in (self.start, self.trans, self.end, self.emit))
        n, v = len(self.states), len(self.vocab)
        arrays = (self.start, self.trans, self.end, self.emit)
        if tuple(a.shape for a in arrays) != ((n,), (n, n), (n,), (n, v)):
            raise ElfError(f"grammar: array shapes do not match {n} states and {v} words")
        if len(set(self.states)) != n or len(set(self.vocab)) != v:
            raise ElfError("grammar: state names and vocabulary words must be unique")
        for label, total in (("start", self.start.sum()), ("transitions+end", self.trans.sum(1) + self.end),
                             ("emissions", self.emit.sum(1))):
            if not np.allclose(total, 1.0, rtol=0.0, atol=1e-9):
                raise ElfError(f"grammar: {label} probabilities do not sum to 1")
        if any((a < 0).any() or not np.isfinite(a).all() for a in arrays):
            raise ElfError("grammar: probabilities must be finite and non-negative")
        self._index = {w: i for i, w in enumerate(self.vocab)}
        self._emit_by_word = np.ascontiguousarray(self.emit.T)
        self._transT = np.ascontiguousarray(self.trans.T)
        # Sparse cumulative tables for fast sampling: bisect on a Python list beats rng.choice per step.
        self._start_table = _table(range(n), self.start)
        self._next_table = [_table([*range(n), -1], np.append(self.trans[s], self.end[s])) for s in range(n)]
        self._emit_table = [_table(range(v), self.emit[s]) for s in range(n)]

    # -- sampling ------------------------------------------------------------------------------------------

    def sample_path(
        self, rng: np.random.Generator, max_words: int = 10_000
    ) -> tuple[list[str], list[str], float]:
        """(hidden states, words, log-probability of this state+word path) of one document."""
        states: list[str] = []
        words: list[str] = []
        logp = 0.0
        s, lp = _draw(self._start_table, rng)
        logp += lp
        while s >= 0:
            if len(words) >= max_words:
                raise ElfError(f"grammar: a sampled document exceeded {max_words} words")
            w, lp_w = _draw(self._emit_table[s], rng)
            states.append(self.states[s])
            words.append(self.vocab[w])
            s, lp_s = _draw(self._next_table[s], rng)
            logp += lp_w + lp_s
        return states, words, logp

    def sample_words(self, rng: np.random.Generator) -> tuple[list[str], float]:
        """One document as words, with the log-probability of the *path* that produced it.

        The path probability is a lower bound of `log_prob(words)`; they agree when only one hidden path
        can produce the words (so far always the case with the built-in lexicon).
        """
        _, words, logp = self.sample_path(rng)
        return words, logp

    # -- likelihood ----------------------------------------------------------------------------------------

    def log_prob(self, words: Sequence[str]) -> float:
        """Exact log P(words, then end of document), summed over all hidden paths (forward algorithm).

        The forward vector is renormalised after every word and the log normalisers are summed, which is
        the forward algorithm in log space without underflow. A word outside the vocabulary is emitted with
        probability `UNKNOWN_WORD_PROB` by every state (a documented floor, so the model is deficient
        there). Sequences the grammar cannot produce get -inf; so does the empty document, because every
        document has at least one sentence.
        """
        return self._forward(words, stream=False)[0]

    def log_prob_stream(self, words: Sequence[str]) -> float:
        """Exact log-probability that a stream of documents (packed with no separator, as lm rows are under
        `tokenize.packing: paragraphs`) begins with these words and a document ends right after them.

        = log Σ over all segmentations of the words into ≥ 1 complete documents of Π P(document): the
        forward algorithm with transitions trans + outer(end, start) (a document may end at any state that
        can end one and the next document start), and the final `end` factor. At least `log_prob(words)`;
        equal when the words split into documents only one way (as themselves). Same floors as `log_prob`.
        """
        return self._forward(words, stream=True)[0]

    def log_prob_floored(self, words: Sequence[str], stream: bool, floor: float) -> tuple[float, int]:
        """(log-probability, forbidden events) of words where every event the grammar forbids — a word outside
        the lexicon, a word that cannot follow the words before it, an end of document where none can end, an
        empty text — costs log `floor` instead of making the whole text impossible (unlike `log_prob`, an unknown
        word is forbidden here, not floored at `UNKNOWN_WORD_PROB`). After a forbidden word the hidden state is
        re-estimated from that word alone (the states that can emit it), so scoring goes on from there.

        Not a normalised distribution: a fixed, model-independent penalty that keeps the perplexity of any set
        of texts finite (`elf.metrics.oracle_ppl`'s `ppl_floored`), so broken samples count instead of being
        dropped. Equals `log_prob` / `log_prob_stream` on texts the grammar can produce (no forbidden event).
        """
        if not 0.0 < floor < 1.0:
            raise ElfError(f"oracle floor probability must lie in (0, 1), got {floor}")
        return self._forward(words, stream, floor)

    def _forward(self, words: Sequence[str], stream: bool, floor: float | None = None) -> tuple[float, int]:
        if not words:
            return (-math.inf, 0) if floor is None else (math.log(floor), 1)
        alpha = self.start
        logp, forbidden = 0.0, 0
        for i, word in enumerate(words):
            if i:
                moved = self._transT @ alpha
                alpha = moved + self.start * float(self.end @ alpha) if stream else moved
            col = self._index.get(word)
            if col is None and floor is not None:  # a word outside the lexicon: the grammar cannot produce it
                logp, forbidden = logp + math.log(floor), forbidden + 1
                alpha = np.full(len(self.states), 1.0 / len(self.states))  # no evidence of the state
                continue
            emit = self._emit_by_word[col] if col is not None else np.full(len(self.states), UNKNOWN_WORD_PROB)
            alpha = alpha * emit
            total = float(alpha.sum())
            if total <= 0.0:
                if floor is None:
                    return -math.inf, 0
                logp, forbidden = logp + math.log(floor), forbidden + 1
                alpha, total = emit, float(emit.sum())  # restart from the states that can emit this word
            else:
                logp += math.log(total)
            alpha = alpha / total
        final = float(alpha @ self.end)
        if final > 0.0:
            return logp + math.log(final), forbidden
        return (-math.inf, 0) if floor is None else (logp + math.log(floor), forbidden + 1)

    def log_prob_text(self, text: str) -> tuple[float, int]:
        """(log-probability, number of words including "." tokens) of a rendered document."""
        words = text_to_words(text)
        return self.log_prob(words), len(words)

    def log_prob_stream_text(self, text: str) -> tuple[float, int]:
        """(`log_prob_stream`, number of words including "." tokens) of rendered, packed documents."""
        words = text_to_words(text)
        return self.log_prob_stream(words), len(words)

    # -- serialisation ---------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (non-zero entries only); `from_dict` rebuilds an identical grammar."""

        def nonzero(keys: Sequence[str], row: np.ndarray) -> dict[str, float]:
            return {keys[i]: float(row[i]) for i in np.flatnonzero(row)}

        return {
            "format": GRAMMAR_FORMAT,
            "states": list(self.states),
            "vocab": list(self.vocab),
            "start": nonzero(self.states, self.start),
            "end": nonzero(self.states, self.end),
            "transitions": {s: nonzero(self.states, self.trans[i]) for i, s in enumerate(self.states)},
            "emissions": {s: nonzero(self.vocab, self.emit[i]) for i, s in enumerate(self.states)},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Grammar:
        """Inverse of `to_dict` (exact: JSON keeps float64 values bit for bit)."""
        if d.get("format") != GRAMMAR_FORMAT:
            raise ElfError(f"grammar: format is {d.get('format')!r}, expected {GRAMMAR_FORMAT!r}")
        missing = [k for k in ("states", "vocab", "start", "end", "transitions", "emissions") if k not in d]
        if missing:
            raise ElfError(f"grammar: missing {', '.join(missing)}")
        states, vocab = list(d["states"]), list(d["vocab"])
        s_idx, w_idx = {s: i for i, s in enumerate(states)}, {w: i for i, w in enumerate(vocab)}
        try:
            start, end = np.zeros(len(states)), np.zeros(len(states))
            trans, emit = np.zeros((len(states), len(states))), np.zeros((len(states), len(vocab)))
            for s, p in d["start"].items():
                start[s_idx[s]] = p
            for s, p in d["end"].items():
                end[s_idx[s]] = p
            for s, row in d["transitions"].items():
                for t, p in row.items():
                    trans[s_idx[s], s_idx[t]] = p
            for s, row in d["emissions"].items():
                for w, p in row.items():
                    emit[s_idx[s], w_idx[w]] = p
        except KeyError as e:
            raise ElfError(f"grammar: unknown state or word {e.args[0]!r}") from None
        return cls(states, vocab, start, trans, end, emit)


def _table(ids: Sequence[int], probs: np.ndarray) -> tuple[list[int], list[float], list[float]]:
    keep = [(i, float(p)) for i, p in zip(ids, probs, strict=True) if p > 0]
    return [i for i, _ in keep], list(accumulate(p for _, p in keep)), [math.log(p) for _, p in keep]


def _draw(table: tuple[list[int], list[float], list[float]], rng: np.random.Generator) -> tuple[int, float]:
    ids, cum, logps = table
    k = min(bisect.bisect_right(cum, rng.random() * cum[-1]), len(ids) - 1)
    return ids[k], logps[k]


# ---------------------------------------------------------------------------------------------------------
# Building a random grammar over a fixed automaton
# ---------------------------------------------------------------------------------------------------------

_CLASS_OF_POS = {"DET": "det", "ADJ": "adj", "NOUN": "noun", "NAME": "name", "VERB": "verb", "PREP": "prep",
                 "ADV": "adv"}


def _sentence_automaton(max_adjectives: int) -> dict[str, dict[str, float]]:
    """Slot → {next slot: prior weight} for one sentence; "START" is the entry, "PERIOD" the exit.

    Sentence = subject (name | det adj{0..k} noun), verb, optional object, optional prepositional
    phrase, optional adverb, ".". Acyclic, so sentences (and documents) have bounded length.
    """
    after_np = {"SUBJ": {"VERB": 1.0}, "OBJ": {"PREP": 0.3, "ADV": 0.1, "PERIOD": 0.6},
                "PP": {"ADV": 0.15, "PERIOD": 0.85}}
    edges: dict[str, dict[str, float]] = {"START": {"SUBJ_DET": 0.65, "SUBJ_NAME": 0.35}}
    for role, nxt in after_np.items():
        first = {f"{role}_ADJ1": 0.3, f"{role}_NOUN": 0.7} if max_adjectives else {f"{role}_NOUN": 1.0}
        edges[f"{role}_DET"] = first
        for k in range(1, max_adjectives + 1):
            more = {f"{role}_ADJ{k + 1}": 0.15, f"{role}_NOUN": 0.85} if k < max_adjectives else {}
            edges[f"{role}_ADJ{k}"] = more or {f"{role}_NOUN": 1.0}
        edges[f"{role}_NOUN"] = dict(nxt)
        edges[f"{role}_NAME"] = dict(nxt)
        if role == "SUBJ":
            edges["VERB"] = {"OBJ_DET": 0.45, "OBJ_NAME": 0.15, "PREP": 0.2, "ADV": 0.1, "PERIOD": 0.1}
        elif role == "OBJ":
            edges["PREP"] = {"PP_DET": 0.8, "PP_NAME": 0.2}
    edges["ADV"] = {"PERIOD": 1.0}
    edges["PERIOD"] = {}
    return edges


def build_grammar(
    seed: int,
    max_sentences: int = 6,
    *,
    max_adjectives: int = 2,
    lexicon: Mapping[str, Sequence[str]] | None = None,
    zipf_exponent: float = 1.1,
    concentration: float = 20.0,
    continue_prob: float = 0.9,
) -> Grammar:
    """A random grammar over the fixed sentence automaton: same shape for every seed, different weights.

    States are (slot, sentence number) pairs, e.g. "OBJ_NOUN@2", so a document has 1..max_sentences
    sentences. Transition weights are Dirichlet(concentration · prior) around hand-set priors; after
    sentence k the document goes on with probability ~continue_prob. Each slot emits its word class with
    Zipf-like weights (1/rank^zipf_exponent over a seeded shuffle), shared by all sentences. A `lexicon`
    (word class → words; missing or empty classes drop their slots) gives e.g. tiny grammars for tests.
    """
    if max_sentences < 1 or max_adjectives < 0 or not 0 < continue_prob < 1:
        raise ElfError("build_grammar: need max_sentences >= 1, max_adjectives >= 0, 0 < continue_prob < 1")
    lex = {c: tuple(dict.fromkeys((lexicon or LEXICON).get(c, ()))) for c in _CLASS_OF_POS.values()}
    rng = np.random.default_rng(seed)
    edges = _sentence_automaton(max_adjectives)
    kept = {k for k in edges if k in ("START", "PERIOD") or lex[_CLASS_OF_POS[_pos(k)]]}
    edges = {k: {t: w for t, w in nxt.items() if t in kept} for k, nxt in edges.items() if k in kept}
    # Keep the slots reachable from START; every one of them but PERIOD needs a way on.
    reachable, todo = [], ["START"]
    while todo:
        k = todo.pop()
        if k not in reachable:
            reachable.append(k)
            todo.extend(edges[k])
    slots = [k for k in edges if k in reachable and k != "START"]  # automaton order, PERIOD last
    for k in ["START", *slots]:
        if k != "PERIOD" and not edges[k]:
            raise ElfError(f"build_grammar: the lexicon leaves slot {k} with no way to finish the sentence")
    probs = {}
    for k in ["START", *(k for k in slots if k != "PERIOD")]:
        targets = list(edges[k])
        prior = np.array([edges[k][t] for t in targets])
        probs[k] = dict(zip(targets, rng.dirichlet(concentration * prior / prior.sum()), strict=True))
    emissions: dict[str, dict[str, float]] = {}
    for k in slots:
        group = k.rstrip("0123456789")  # ADJ1, ADJ2, ... of one phrase share a distribution
        if group not in emissions:
            words = lex[_CLASS_OF_POS[_pos(k)]] if k != "PERIOD" else (PERIOD,)
            weights = np.empty(len(words))
            weights[rng.permutation(len(words))] = 1.0 / np.arange(1, len(words) + 1) ** zipf_exponent
            emissions[group] = dict(zip(words, weights / weights.sum(), strict=True))
    go_on = [rng.dirichlet(concentration * np.array([continue_prob, 1 - continue_prob]))[0]
             for _ in range(max_sentences - 1)] + [0.0]

    states = [f"{k}@{n}" for n in range(1, max_sentences + 1) for k in slots]
    vocab = list(dict.fromkeys(w for group in emissions.values() for w in group))
    s_idx, w_idx = {s: i for i, s in enumerate(states)}, {w: i for i, w in enumerate(vocab)}
    start, end = np.zeros(len(states)), np.zeros(len(states))
    trans, emit = np.zeros((len(states), len(states))), np.zeros((len(states), len(vocab)))
    for t, p in probs["START"].items():
        start[s_idx[f"{t}@1"]] = p
    for n in range(1, max_sentences + 1):
        for k in slots:
            i = s_idx[f"{k}@{n}"]
            for w, p in emissions[k.rstrip("0123456789")].items():
                emit[i, w_idx[w]] = p
            if k != "PERIOD":
                for t, p in probs[k].items():
                    trans[i, s_idx[f"{t}@{n}"]] = p
            else:
                end[i] = 1.0 - go_on[n - 1]
                for t, p in probs["START"].items() if n < max_sentences else ():
                    trans[i, s_idx[f"{t}@{n + 1}"]] = go_on[n - 1] * p
    return Grammar(states, vocab, start, trans, end, emit)


# ---------------------------------------------------------------------------------------------------------
# LM corpus and its oracle
# ---------------------------------------------------------------------------------------------------------


def generate_lm(grammar: Grammar, seed: int, n: int) -> Iterator[str]:
    """n documents as text, deterministic from (grammar, seed)."""
    rng = np.random.default_rng([seed, _STREAM_LM])
    for _ in range(n):
        words, _ = grammar.sample_words(rng)
        yield words_to_text(words)


def oracle_perplexity(grammar: Grammar, texts: Iterable[str], stream: bool = False) -> float:
    """Per-word perplexity of texts under the true grammar: exp(-Σ log p / Σ (words + 1)).

    The +1 per text counts the end-of-document event, which `log_prob` includes. One ungrammatical text
    (log p = -inf) makes the result inf; unknown words only cost their `UNKNOWN_WORD_PROB` floor.
    `stream`: score each text as packed documents (`log_prob_stream`: the stream begins with the text and
    a document ends right after it), for models trained on rows packed across documents.
    """
    score = grammar.log_prob_stream_text if stream else grammar.log_prob_text
    total_logp, total_events = 0.0, 0
    for text in texts:
        logp, n_words = score(text)
        total_logp += logp
        total_events += n_words + 1
    if total_events == 0:
        raise ElfError("oracle_perplexity: no texts to score")
    return math.exp(-total_logp / total_events) if total_logp > -math.inf else math.inf


# ---------------------------------------------------------------------------------------------------------
# Translation corpus (German-like → English)
# ---------------------------------------------------------------------------------------------------------


def _to_german(states: Sequence[str], words: Sequence[str]) -> list[str]:
    """Reorder each sentence (adjectives after their noun, the verb last) and map words to German."""
    out: list[str] = []
    tagged = list(zip(map(_pos, states), words, strict=True))
    sentences = _split_sentences([w if pos == "PERIOD" else (pos, w) for pos, w in tagged])
    for sentence in sentences:
        body = [t for t in sentence if t != PERIOD]
        reordered, i = [], 0
        while i < len(body):
            if body[i][0] == "DET":  # det adj* noun → det noun adj*
                j = i + 1
                while body[j][0] == "ADJ":
                    j += 1
                reordered += [body[i], body[j], *body[i + 1:j]]
                i = j + 1
            else:
                reordered.append(body[i])
                i += 1
        verbs = [t for t in reordered if t[0] == "VERB"]
        reordered = [t for t in reordered if t[0] != "VERB"] + verbs
        out += [TO_GERMAN[w] for _, w in reordered] + [PERIOD] * (len(sentence) - len(body))
    return out


def translate_source_to_target(source: str) -> str:
    """Undo the demo translation exactly: German words → English, then restore English word order.

    Per sentence: the last word is the verb; every determiner is followed by its noun and then that noun's
    adjectives (the only adjective-class words that can follow a noun), which move back in front of it;
    the verb goes back right after the subject (the first name or noun phrase). Unknown words pass through.
    """
    out: list[str] = []
    for sentence in _split_sentences([FROM_GERMAN.get(w, w) for w in text_to_words(source)]):
        tail = [PERIOD] if sentence[-1] == PERIOD else []
        body = sentence[:len(sentence) - len(tail)]
        if not body:
            out += tail
            continue
        verb, rest = body[-1], body[:-1]
        english: list[str] = []
        subject_end, i = None, 0
        while i < len(rest):
            if rest[i] in _DET_SET and i + 1 < len(rest):
                j = i + 2
                while j < len(rest) and rest[j] in _ADJ_SET:
                    j += 1
                english += [rest[i], *rest[i + 2:j], rest[i + 1]]
                i = j
            else:
                english.append(rest[i])
                i += 1
            subject_end = len(english) if subject_end is None else subject_end
        english.insert(subject_end or 0, verb)
        out += english + tail
    return words_to_text(out)


def generate_translation(
    seed: int, n: int, *, grammar_seed: int = DEMO_GRAMMAR_SEED, max_words: int = 24, max_sentences: int = 2,
    lexicon: Mapping[str, Sequence[str]] | None = None,
) -> Iterator[tuple[str, str]]:
    """n (German-like source, English target) pairs of 1..max_sentences sentences, at most max_words words each side.

    The English comes from a fixed grammar (`grammar_seed`, over `lexicon`), the seed only picks samples; the
    source is a deterministic, invertible function of the English (`translate_source_to_target` inverts it).
    """
    grammar = build_grammar(grammar_seed, max_sentences=max_sentences, lexicon=lexicon)
    rng = np.random.default_rng([seed, _STREAM_TRANSLATION])
    made = 0
    while made < n:
        states, words, _ = grammar.sample_path(rng)
        if len(words) <= max_words:
            made += 1
            yield words_to_text(_to_german(states, words)), words_to_text(words)


# ---------------------------------------------------------------------------------------------------------
# Summarisation corpus
# ---------------------------------------------------------------------------------------------------------


def summarize_document(document: str) -> str:
    """The summary rule of the demo summarisation corpus:

    1. The main person is the name mentioned most often (ties: the one mentioned first).
    2. The event is the first sentence that starts "<main person> <verb> <determiner> ...".
    3. Its object noun is the word right before the first preposition, adverb or "." after the determiner
       (adjectives are dropped; the determiner becomes "the").
    4. Summary: "<Main person> <verb> the <noun>."
    """
    words = text_to_words(document)
    names = [w for w in words if w in _NAME_SET]
    if not names:
        raise ElfError("summarize_document: the document mentions no name")
    counts = Counter(names)
    main = max(counts, key=lambda w: (counts[w], -names.index(w)))
    for sentence in _split_sentences(words):
        if len(sentence) > 3 and sentence[0] == main and sentence[2] in _DET_SET:
            stop = next((i for i in range(3, len(sentence))
                         if sentence[i] in _PREP_ADV_SET or sentence[i] == PERIOD), len(sentence))
            return words_to_text([main, sentence[1], "the", sentence[stop - 1], PERIOD])
    raise ElfError(f"summarize_document: no sentence starts with {main!r}, a verb and a determiner")


def _sample_sentence(grammar: Grammar, rng: np.random.Generator, avoid: str, prefix: tuple[str, ...] = (),
                     slots: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """A sentence without the word `avoid`, whose slots start with `prefix` and include one of `slots`."""
    for _ in range(10_000):
        states, words, _ = grammar.sample_path(rng)
        kinds = [s.split("@")[0] for s in states]
        if (avoid not in words and tuple(kinds[:len(prefix)]) == prefix
                and (not slots or any(k in slots for k in kinds))):
            return kinds, words
    raise ElfError("demo summarisation: could not sample a sentence of the required shape")


def _summary_pair(grammar: Grammar, rng: np.random.Generator, names: Sequence[str], min_sentences: int,
                  max_sentences: int, max_words: int) -> tuple[str, str]:
    while True:
        main = names[int(rng.integers(len(names)))]
        n_sent = int(rng.integers(min_sentences, max_sentences + 1))
        event_at = int(rng.integers(n_sent))
        others = [i for i in range(n_sent) if i != event_at]
        mentions = {int(i) for i in rng.choice(others, size=int(rng.integers(1, 3)), replace=False)}
        words: list[str] = []
        summary = ""
        for i in range(n_sent):
            if i == event_at:
                kinds, sent = _sample_sentence(grammar, rng, main, ("SUBJ_NAME", "VERB", "OBJ_DET"))
                sent[0] = main
                summary = words_to_text([main, sent[1], "the", sent[kinds.index("OBJ_NOUN")], PERIOD])
            elif i in mentions:  # another mention of the main person; as subject only after the event
                slots = ("OBJ_NAME", "PP_NAME") + (("SUBJ_NAME",) if i > event_at else ())
                kinds, sent = _sample_sentence(grammar, rng, main, slots=slots)
                sent[next(j for j, k in enumerate(kinds) if k in slots)] = main
            else:
                _, sent = _sample_sentence(grammar, rng, main)
            words += sent
        counts = Counter(w for w in words if w in _NAME_SET)
        if len(words) <= max_words and all(c < counts[main] for w, c in counts.items() if w != main):
            return words_to_text(words), summary


def generate_summarization(
    seed: int, n: int, *, grammar_seed: int = DEMO_GRAMMAR_SEED, min_sentences: int = 4,
    max_sentences: int = 8, max_words: int = 80, lexicon: Mapping[str, Sequence[str]] | None = None,
) -> Iterator[tuple[str, str]]:
    """n (document, summary) pairs; the summary follows the rule of `summarize_document`.

    A document has min..max_sentences sentences (at most max_words words) from a fixed one-sentence
    grammar over `lexicon`: one event sentence "<Main> <verb> <det> ... <noun> ...", 1-2 more mentions of
    the main person (as object, or as subject after the event), and filler sentences that never mention them.
    """
    if not 3 <= min_sentences <= max_sentences:
        raise ElfError("demo summarisation: need 3 <= min_sentences <= max_sentences (an event, two mentions)")
    lexicon = lexicon or LEXICON
    names = tuple(lexicon.get("name", ()))
    if len(names) < 2:
        raise ElfError("demo summarisation: the lexicon needs at least two names")
    grammar = build_grammar(grammar_seed, max_sentences=1, lexicon=lexicon)
    rng = np.random.default_rng([seed, _STREAM_SUMMARY])
    for _ in range(n):
        yield _summary_pair(grammar, rng, names, min_sentences, max_sentences, max_words)
