r"""The safety check at both ends of the pipeline: refuse a prompt before any compute, check images after.

Imagen was never released, partly for safety (Saharia et al., 2022, sec. 6); Stable Diffusion shipped
with a checker instead. mini-imagen builds the same two gates a student can read in one sitting:

    prompt ─► check_prompt ─► (refused: SafetyRefusal, nothing is computed)
           ─► text encoder ─► cascade ─► images ─► check_images ─► flagged images become black

**Prompt check** (``PromptChecker``): people dodge word lists, so the prompt is first *normalised*:
Unicode NFKC, case folding, look-alike letters from other scripts (Cyrillic "а" for Latin "a"),
leetspeak ("k1ll"), and letters spaced or dotted apart ("g u n", "g.u.n"). Then two tests:

1. **terms**: a restricted word or phrase anywhere in the prompt, allowing one typo in words of six
   letters or more (a swap of two letters in five-letter words) (same first letter: typos rarely hit the first letter, and "filling" is not "killing");
2. **meaning**: the cosine similarity of the prompt's sentence embedding (the frozen text encoder's
   pooled vector) to each concept's descriptions, $\cos(e_p, e_c) \ge \tau_c$ with a threshold per concept,
   which catches paraphrases no list foresees ("a tool that fires bullets").

**Image check** (``ImageSafetyChecker``) mirrors diffusers' ``StableDiffusionSafetyChecker``: image
embeddings $e_i$ are compared with concept embeddings $e_c$ by cosine similarity; an image is flagged when
$\cos(e_i, e_c) - \tau_c + a > 0$ for any concept, where the adjustment $a$ is raised by
``special_care_adjustment`` when a *special-care* concept already matches. Flagged images are replaced by
black images and reported per image (``nsfw_content_detected``, the diffusers name).

What the image check can and cannot see: one embedding per image is a summary of the whole picture.
The shipped threshold (0.65 for the Red Cross emblem, mini-CLIP) flags 100% of pictures *of* red crosses
and 1.5% of other scenes (tests/test_safety.py), but a small red cross among three other shapes moves the
summary little and usually passes; the prompt check is the first line for that reason.

The concepts are data: ``mini_imagen/data/safety_concepts.json`` (names, terms, descriptions, thresholds),
which an instructor can edit or replace (``load_concepts(path)``). The embedding models here are small and
trained on toy data; a real deployment uses the same mechanism with a strong embedding model (CLIP
ViT-L/14 in Stable Diffusion's checker) and a carefully evaluated concept list.
"""

from __future__ import annotations

import json
from functools import cached_property, lru_cache
import re
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_CONCEPTS = Path(__file__).resolve().parent / "data" / "safety_concepts.json"
MAX_PROMPT_CHARS = 1000  # longer prompts are cut (with a warning) before checking: the encoder reads 32 tokens


class SafetyRefusal(ValueError):
    """A prompt was refused; the message names the concept, never the raw scores."""


class SafetyCheckDisabledWarning(UserWarning):
    """Generation ran with the safety check turned off."""


# ----------------------------------------------------------------------------- concepts (data)
@dataclass(frozen=True)
class SafetyConcept:
    """One restricted concept, as written in the concepts file."""

    name: str
    terms: tuple[str, ...] = ()
    descriptions: tuple[str, ...] = ()
    prompt_threshold: float = 0.6
    image_prompts: tuple[str, ...] = ()
    image_threshold: float | None = None
    special_care: bool = False


@dataclass(frozen=True)
class SafetyConcepts:
    concepts: tuple[SafetyConcept, ...]
    special_care_adjustment: float = 0.01


def load_concepts(path: str | Path = DEFAULT_CONCEPTS) -> SafetyConcepts:
    """Read a concepts file (see the default one for the format); one clear error if it is malformed."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        concepts = tuple(
            SafetyConcept(
                name=c["name"], terms=tuple(c.get("terms", ())), descriptions=tuple(c.get("descriptions", ())),
                prompt_threshold=float(c.get("prompt_threshold", 0.6)), image_prompts=tuple(c.get("image_prompts", ())),
                image_threshold=None if c.get("image_threshold") is None else float(c["image_threshold"]),
                special_care=bool(c.get("special_care", False)),
            )
            for c in data["concepts"]
        )
    except FileNotFoundError:
        raise ValueError(f"safety concepts file {path} does not exist") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"safety concepts file {path} is malformed ({error}); compare it with {DEFAULT_CONCEPTS}") from None
    if not concepts:
        raise ValueError(f"safety concepts file {path} lists no concepts")
    return SafetyConcepts(concepts, float(data.get("special_care_adjustment", 0.01)))


# ----------------------------------------------------------------------------- normalisation
# Letters from other scripts that look like Latin ones (a few of Unicode's "confusables").
HOMOGLYPHS = str.maketrans({
    "а": "a", "в": "b", "с": "c", "е": "e", "ё": "e", "һ": "h", "і": "i", "ј": "j", "к": "k", "м": "m", "н": "h",
    "о": "o", "р": "p", "ԛ": "q", "ѕ": "s", "т": "t", "у": "y", "х": "x", "ԝ": "w", "ɡ": "g", "ı": "i",
    "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t",
    "υ": "u", "χ": "x", "ω": "w", "ս": "u", "ᥙ": "u", "ո": "n", "ɑ": "a", "ⅰ": "i",
})
# Leetspeak, applied only inside words that also contain letters ("k1ll" -> "kill", but "2 circles" stays).
LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i", "|": "l"})
_LEET_WORD = re.compile(r"[a-z0-9@$!|]+")  # runs between spaces and hyphens: "ak-47" keeps its digits
_SPACED_OUT = re.compile(r"\b(?:[a-z][\s.\-_*+~'`]+){2,}[a-z]\b")  # "g u n", "g.u.n", "k-i-l-l"


def normalize_prompt(prompt: str) -> str:
    """The prompt as a checker should read it: one spelling for all the ways of writing the same words."""
    text = unicodedata.normalize("NFKC", prompt)  # full-width "ｇｕｎ" -> "gun", ligatures, ...
    text = "".join(ch for ch in text if unicodedata.category(ch)[0] != "C")  # zero-width and control characters
    text = unicodedata.normalize("NFKD", text.casefold().translate(HOMOGLYPHS))
    text = "".join(ch for ch in text if not unicodedata.combining(ch))  # "gún" -> "gun"
    text = _LEET_WORD.sub(lambda m: m.group().translate(LEET) if re.search(r"[a-z]", m.group()) else m.group(), text)
    text = _SPACED_OUT.sub(_join_spaced_letters, text)  # "a g u n" -> "a gun"
    text = text.replace("ph", "f")  # "pornografic" and "pornographic" are one word to a reader
    return " ".join(re.findall(r"[a-z0-9]+", text))


def _join_spaced_letters(match: re.Match) -> str:
    letters = re.sub(r"[^a-z]", "", match.group())
    if match.group().startswith("a ") and len(letters) > 3:  # keep the article: "a g u n" -> "a gun"
        return "a " + letters[1:]
    return letters


def _stem(word: str) -> str:
    for suffix in ("ings", "ing", "es", "ed", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def _one_typo_apart(a: str, b: str) -> bool:
    """Damerau-Levenshtein distance <= 1: one letter added, dropped, changed, or two swapped."""
    if a == b:
        return True
    if abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diffs = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diffs) == 1 or (len(diffs) == 2 and diffs[1] == diffs[0] + 1
                                   and a[diffs[0]] == b[diffs[1]] and a[diffs[1]] == b[diffs[0]])
    short, long = (a, b) if len(a) < len(b) else (b, a)
    return any(long[:i] + long[i + 1:] == short for i in range(len(long)))


def _swapped_once(a: str, b: str) -> bool:
    """Two neighbouring letters swapped: "rilfe" for "rifle"."""
    diffs = [i for i in range(len(a)) if len(a) == len(b) and a[i] != b[i]]
    return len(diffs) == 2 and diffs[1] == diffs[0] + 1 and a[diffs[0]] == b[diffs[1]] and a[diffs[1]] == b[diffs[0]]


def _word_matches(word: str, term: str) -> bool:
    if word == term or _stem(word) == _stem(term):
        return True
    if word[:1] != term[:1]:  # typos rarely hit the first letter
        return False
    if len(term) >= 6:
        return _one_typo_apart(word, term) or _one_typo_apart(_stem(word), term)
    return len(term) == 5 and _swapped_once(word, term)  # 5 letters: only swaps ("blond" is not "blood")


@lru_cache(maxsize=1024)
def _term_words(term: str) -> tuple[str, ...]:
    return tuple(normalize_prompt(term).split())


def find_term(normalized: str, terms: Sequence[str]) -> str | None:
    """The first restricted term found in a normalised prompt (multi-word terms match as a phrase)."""
    words = normalized.split()
    compact = "".join(words)
    for term in terms:
        parts = _term_words(term)
        for start in range(len(words) - len(parts) + 1):
            if all(_word_matches(w, p) for w, p in zip(words[start:start + len(parts)], parts)):
                return term
        if len(parts) > 1 and "".join(parts) in words:  # "redcross", "machinegun"
            return term
        if len(parts) == 1 and len(parts[0]) >= 7 and parts[0] in compact:  # long words split by spaces: "ammu nition"
            return term
    return None


# ----------------------------------------------------------------------------- the two checks
@dataclass
class SafetyReport:
    """The verdict on one prompt or image."""

    allowed: bool
    concept: str | None = None
    reason: str = ""  # "the word 'gun'" / "its meaning" / "the image"

    def __str__(self) -> str:
        return "allowed" if self.allowed else f"refused: matches the restricted concept '{self.concept}' ({self.reason})"


class PromptChecker:
    """Refuse prompts that name or describe a restricted concept (terms first, then meaning)."""

    def __init__(self, concepts: SafetyConcepts | None = None, text_encoder=None):
        self.concepts = concepts or load_concepts()
        self._text_encoder = text_encoder
        self._description_embeddings: list[Tensor] | None = None

    @property
    def text_encoder(self):
        if self._text_encoder is None:
            from mini_imagen.text import load_text_encoder

            self._text_encoder = load_text_encoder()
        return self._text_encoder

    def _embed(self, sentences: Sequence[str]) -> Tensor:
        return F.normalize(self.text_encoder.encode(list(sentences)).pooled.float(), dim=-1)

    def check(self, prompts: str | Sequence[str]) -> list[SafetyReport]:
        """One ``SafetyReport`` per prompt."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        cleaned = [clean_prompt(p) for p in prompts]
        reports: list[SafetyReport | None] = []
        for prompt in cleaned:
            normalized = normalize_prompt(prompt)
            report = None
            for concept in self.concepts.concepts:
                term = find_term(normalized, concept.terms)
                if term is not None:
                    report = SafetyReport(False, concept.name, f"the words '{term}'")
                    break
            reports.append(report)
        pending = [i for i, r in enumerate(reports) if r is None]
        if pending:
            similarity = self.semantic_similarity([normalize_prompt(cleaned[i]) for i in pending])  # (P, K)
            for row, i in enumerate(pending):
                for k, concept in enumerate(self.concepts.concepts):
                    if concept.descriptions and similarity[row, k] >= concept.prompt_threshold:
                        reports[i] = SafetyReport(False, concept.name, "its meaning")
                        break
                else:
                    reports[i] = SafetyReport(True)
        return [r for r in reports if r is not None]

    def semantic_similarity(self, prompts: Sequence[str]) -> Tensor:
        """(P, K): for each prompt, the highest cosine similarity to any description of concept k."""
        if self._description_embeddings is None:
            self._description_embeddings = [self._embed(c.descriptions) if c.descriptions else torch.zeros(0, 1)
                                            for c in self.concepts.concepts]
        prompt_embeddings = self._embed(prompts)  # (P, D), unit length
        columns = [(prompt_embeddings @ e.T).max(dim=1).values if len(e) else torch.full((len(prompts),), -1.0)
                   for e in self._description_embeddings]
        return torch.stack(columns, dim=1)

    def require_allowed(self, prompts: str | Sequence[str]) -> None:
        """Raise ``SafetyRefusal`` naming the concept of the first refused prompt."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        for prompt, report in zip(prompts, self.check(prompts)):
            if not report.allowed:
                raise SafetyRefusal(f"prompt {prompt[:60]!r} refused: it matches the restricted concept "
                                    f"'{report.concept}' ({report.reason}); rephrase it, or see "
                                    "mini_imagen/data/safety_concepts.json")


def clean_prompt(prompt: str) -> str:
    """Reject empty prompts; cut very long ones with a warning (the check still reads the start)."""
    if not isinstance(prompt, str):
        raise ValueError(f"a prompt must be a string, got {type(prompt).__name__}")
    text = "".join(ch if ch.isprintable() else " " for ch in prompt).strip()
    if not text:
        raise ValueError("a prompt is empty (or only spaces / control characters); give some words, "
                         "e.g. 'a red circle above a blue square'")
    if len(text) > MAX_PROMPT_CHARS:
        warnings.warn(f"prompt of {len(text)} characters cut to {MAX_PROMPT_CHARS} for the safety check",
                      stacklevel=3)
        text = text[:MAX_PROMPT_CHARS]
    return text


class ImageSafetyChecker:
    """Flag images close to a restricted concept, as ``StableDiffusionSafetyChecker`` does.

    ``embed_images``: images (B, 3, H, W) in [-1, 1] -> (B, D) embeddings; ``concept_embeddings``: (K, D),
    one row per concept with an image threshold (``thresholds``: (K,)). Both are L2-normalised here.
    """

    def __init__(self, embed_images: Callable[[Tensor], Tensor], concept_embeddings: Tensor, thresholds: Tensor,
                 names: Sequence[str], special_care: Sequence[bool] | None = None,
                 special_care_adjustment: float = 0.01):
        if concept_embeddings.shape[0] != len(names) or thresholds.shape[0] != len(names):
            raise ValueError("concept_embeddings, thresholds and names must have one row per concept")
        self.embed_images = embed_images
        self.concept_embeddings = F.normalize(concept_embeddings.float(), dim=-1)
        self.thresholds = thresholds.float()
        self.names = list(names)
        self.special_care = torch.tensor(special_care or [False] * len(names))
        self.special_care_adjustment = special_care_adjustment

    @classmethod
    def from_mini_clip(cls, mini_clip, concepts: SafetyConcepts | None = None) -> "ImageSafetyChecker":
        """Concept embeddings = mini-CLIP text embeddings of each concept's ``image_prompts`` (averaged)."""
        concepts = concepts or load_concepts()
        checked = [c for c in concepts.concepts if c.image_threshold is not None and c.image_prompts]
        if not checked:
            raise ValueError("no concept in the concepts file has image_prompts and an image_threshold")
        with torch.no_grad():
            rows = [F.normalize(mini_clip.encode_text(list(c.image_prompts)).float(), dim=-1).mean(0) for c in checked]
        return cls(mini_clip.encode_image, torch.stack(rows), torch.tensor([c.image_threshold for c in checked]),
                   [c.name for c in checked], [c.special_care for c in checked], concepts.special_care_adjustment)

    @torch.no_grad()
    def scores(self, images: Tensor) -> Tensor:
        """(B, K) concept scores: $\\cos(e_i, e_c) - \\tau_c + a$; an image is flagged if any score > 0."""
        embeddings = F.normalize(self.embed_images(images.float()).float(), dim=-1)  # the embedder is float32
        cosine = embeddings @ self.concept_embeddings.to(embeddings.device).T  # (B, K)
        thresholds = self.thresholds.to(cosine.device)
        special = self.special_care.to(cosine.device)
        # A special-care match makes every concept of that image stricter (diffusers' "adjustment").
        special_hit = ((cosine - thresholds) > 0) & special
        adjustment = special_hit.any(dim=1, keepdim=True).float() * self.special_care_adjustment
        return cosine - thresholds + adjustment

    def __call__(self, images: Tensor) -> tuple[Tensor, list[bool]]:
        """Black out flagged images; returns (images, nsfw_content_detected) like diffusers."""
        scores = self.scores(images)
        flagged = (scores > 0).any(dim=1)
        if flagged.any():
            images = images.clone()
            images[flagged.to(images.device)] = -1.0  # black in [-1, 1]
            names = sorted({self.names[k] for k in scores[flagged].argmax(dim=1).tolist()})
            print(f"mini-imagen: {int(flagged.sum())} image(s) replaced by black: they match the restricted "
                  f"concept(s) {', '.join(repr(n) for n in names)}")
        return images, flagged.tolist()


def default_image_checker() -> ImageSafetyChecker | None:
    """The image check over the shipped mini-CLIP, or None (with a note) while its weights are not installed."""
    try:
        from mini_imagen.evaluation.clip import load_mini_clip
    except ImportError:
        return None
    try:
        mini_clip = load_mini_clip()
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"mini-imagen: note: the image safety check is unavailable ({str(error).splitlines()[0]}); "
              "prompts are still checked")
        return None
    return ImageSafetyChecker.from_mini_clip(mini_clip)


class SafetyChecks:
    """Both gates with their models loaded once: what ``Imagen.sample`` and ``MiniImagenPipeline`` run
    by default. ``text_encoder``: the generator's own frozen encoder (the prompt check reuses it)."""

    def __init__(self, text_encoder=None):
        self.prompt_checker = PromptChecker(text_encoder=text_encoder)

    @cached_property
    def image_checker(self) -> Callable[[Tensor], tuple[Tensor, list[bool]]] | None:
        return default_image_checker()  # loaded on the first image check, then kept (None stays None)

    def check_prompts(self, prompts: str | Sequence[str]) -> None:
        """Raise ``SafetyRefusal`` (naming the concept) before any compute is spent on a refused prompt."""
        self.prompt_checker.require_allowed(prompts)

    def check_images(self, images: Tensor) -> tuple[Tensor, list[bool] | None]:
        """(images with flagged ones black, one flag per image), or (images, None) without an image checker."""
        checker = self.image_checker
        return checker(images) if checker is not None else (images, None)


def warn_safety_off(how: str, stacklevel: int = 3) -> None:
    """The visible warning every generator gives when its safety check is turned off."""
    warnings.warn(f"the safety check is off ({how}): prompts and images are not checked",
                  SafetyCheckDisabledWarning, stacklevel=stacklevel)


class SafetyCheckerUnavailableError(RuntimeError):
    """The optional Stable Diffusion safety checker cannot be loaded (no hub, or diffusers cannot build it)."""


def load_stable_diffusion_safety_checker(name: str = "CompVis/stable-diffusion-safety-checker",
                                         device: str | torch.device = "cpu") -> Callable[[Tensor], tuple[Tensor, list[bool]]]:
    """The real ``StableDiffusionSafetyChecker`` (CLIP ViT-L/14, 1.2 GB) by hub name, wrapped for our images.

    Online only: offline (``HF_HUB_OFFLINE=1`` or no connection within a few seconds) it raises one
    clear ``SafetyCheckerUnavailableError`` instead of hanging.
    """
    from mini_imagen.text import _offline_mode, hub_is_reachable

    if _offline_mode() or not hub_is_reachable():
        raise SafetyCheckerUnavailableError(
            f"the safety checker '{name}' needs the Hugging Face hub, which is not reachable from here; "
            "use the built-in check (the default) or run where the hub is reachable (e.g. Colab)")
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    try:
        checker = StableDiffusionSafetyChecker.from_pretrained(name).to(device).eval()
        processor = CLIPImageProcessor.from_pretrained(name)
    except OSError as error:
        raise SafetyCheckerUnavailableError(f"could not load '{name}' ({str(error).splitlines()[0]})") from None

    @torch.no_grad()
    def check(images: Tensor) -> tuple[Tensor, list[bool]]:
        pixels = ((images.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()  # NHWC in [0, 1]
        clip_input = processor(images=list(pixels), return_tensors="pt", do_rescale=False).pixel_values
        _, flags = checker(images=pixels, clip_input=clip_input.to(device))
        images = images.clone()
        images[torch.tensor(flags)] = -1.0
        return images, [bool(f) for f in flags]

    return check
