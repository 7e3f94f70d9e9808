"""The policy model: a tiny Qwen2 built from scratch (embedded default) or any HF causal LM checkpoint.

The tiny model's tokenizer is a Unigram model over a *fixed* vocabulary made from the world's lexicon:
protocol tags (one token each), template words, name syllables, single characters and byte fallback. Names are
concatenations of syllables, so an entity never seen in training is still made of known tokens: the model has to
learn the procedure (search, then copy from the passage), not memorize names. Decoding is lossless (Metaspace +
byte fallback), so the text the environment parses is exactly what the model wrote.

Both kinds are saved as ordinary HF directories and loaded back through `from_pretrained`, the same call that loads
`Qwen/Qwen2.5-3B` for a GPU user.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Iterable
from pathlib import Path

import torch

from tspo_core.config import ModelConfig, TinyModelConfig
from tspo_core.errors import ConfigError

PROTOCOL_TAGS: tuple[str, ...] = (
    "<think>", "</think>", "<search>", "</search>", "<answer>", "</answer>", "<information>", "</information>",
)
EOS, PAD, UNK = "<|endoftext|>", "<|pad|>", "<unk>"
_SPACE = "\u2581"  # Metaspace marker

# Unigram scores: the Viterbi segmentation maximizes the sum, so whole words beat syllables beat characters.
_WORD, _SYLLABLE, _CHAR = -1.0, -3.0, -10.0


def _vocab(words: Iterable[str], syllables: Iterable[str]) -> list[tuple[str, float]]:
    scores: dict[str, float] = {}

    def add(piece: str, score: float) -> None:
        scores[piece] = max(score, scores.get(piece, score))

    for ch in string.ascii_letters + string.digits + string.punctuation + " \n\t":
        add(ch, _CHAR)
        add(_SPACE + ch, _CHAR)
    add(_SPACE, _CHAR)
    for w in words:
        add(_SPACE + w, _WORD)
        add(w, _WORD - 0.5)
    for s in syllables:
        for form in {s.lower(), s.capitalize()}:
            add(form, _SYLLABLE)
            add(_SPACE + form, _SYLLABLE)
    bytes_ = [(f"<0x{b:02X}>", _CHAR - 5) for b in range(256)]
    return [(UNK, 0.0), (EOS, 0.0), (PAD, 0.0)] + bytes_ + sorted(scores.items())


def build_tokenizer(words: Iterable[str], syllables: Iterable[str]):
    """A fast HF tokenizer over a fixed vocabulary (see module docstring)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for text in words for w in re.findall(r"[A-Za-z]+", text)})
    tok = Tokenizer(models.Unigram(_vocab(words, syllables), unk_id=0, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([
        decoders.ByteFallback(), decoders.Metaspace(replacement=_SPACE, prepend_scheme="never", split=True)])
    tok.add_special_tokens([AddedToken(t, special=True) for t in (UNK, EOS, PAD)])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in PROTOCOL_TAGS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=UNK, eos_token=EOS, pad_token=PAD,
                                   bos_token=None, clean_up_tokenization_spaces=False)


def build_tiny_model(cfg: TinyModelConfig, tokenizer, seed: int = 0):
    """A randomly initialized Qwen2ForCausalLM sized by `cfg` for `tokenizer`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def check_tokenizer(tokenizer, source: str) -> None:
    """Each protocol tag must survive encode -> decode, and a pad/eos id must exist."""
    for tag in PROTOCOL_TAGS:
        ids = tokenizer.encode(tag, add_special_tokens=False)
        if tokenizer.decode(ids) != tag:
            raise ConfigError(f"{source}: tokenizer cannot represent the protocol tag {tag!r} "
                              f"(decodes to {tokenizer.decode(ids)!r})")
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"{source}: tokenizer has no eos token")


# Encoder families that AutoModelForCausalLM still loads (as *LMHeadModel, with only a warning): they would train,
# then fail in generation. A checkpoint of one of them saved with is_decoder=True is a real causal LM and passes.
_ENCODER_ONLY = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "roformer",
                           "megatron-bert", "bert-generation", "data2vec-text", "xmod", "rembert"})

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


_LOADING_FLAGS = ("local_files_only", "is_local")
"""How transformers loaded a tokenizer (e.g. whether HF offline mode was set), which it would write back into every
`tokenizer_config.json` saved from it: a property of the environment, not of the tokenizer, and it would give the
same checkpoint another DVC hash."""


def _load_tokenizer(source: str):
    """AutoTokenizer, except that a tokenizer saved as a plain `TokenizersBackend` (ours) is loaded as one:
    AutoTokenizer would otherwise pick the model type's class (Qwen2Tokenizer) and rebuild a different vocabulary.
    The loading flags are dropped (`_LOADING_FLAGS`)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg_file = Path(source) / "tokenizer_config.json"
    declared = (json.loads(cfg_file.read_text(encoding="utf-8")).get("tokenizer_class") if cfg_file.is_file()
                else None)
    if declared in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        tok = PreTrainedTokenizerFast.from_pretrained(source)
    else:
        tok = AutoTokenizer.from_pretrained(source)
    for flag in _LOADING_FLAGS:
        tok.init_kwargs.pop(flag, None)
    return tok


MODEL_FILES = ("config.json",)
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.pt", "*.ckpt", "*.gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "qwen.tiktoken",
                   "tokenizer.tiktoken")


def check_checkpoint_files(path: str | Path) -> None:
    """A local checkpoint directory must hold a model (config.json and weights) and a tokenizer; raises
    `ConfigError` saying which is missing (the loaders' own messages would blame a missing package instead)."""
    root = Path(path)
    if not root.is_dir():
        return  # a hub name, or a missing path (from_pretrained names it)
    names = {p.name for p in root.iterdir()}
    missing = []
    if not any(n in names for n in MODEL_FILES) or not any(any(root.glob(g)) for g in WEIGHT_PATTERNS):
        missing.append("no model files (config.json and *.safetensors or pytorch_model.bin)")
    if not any(n in names for n in TOKENIZER_FILES):
        missing.append(f"no tokenizer files (one of {', '.join(TOKENIZER_FILES)}): the checkpoint's tokenizer is "
                       "missing (save it beside the model with tokenizer.save_pretrained)")
    if missing:
        raise ConfigError(f"{root}: not a complete checkpoint: {'; '.join(missing)}")


def check_finite_weights(model, source: str) -> None:
    """Refuse a checkpoint whose weights hold NaN or inf (it would generate garbage and score 0 without a word),
    naming the weight file and the first bad tensors."""
    from tspo_core.train.checkpoint import CheckpointError

    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if not bad:
        return
    where, root = source, Path(source)
    if root.is_dir():  # the weight files holding the bad tensors (a sharded checkpoint's index maps them)
        weight_map: dict[str, str] = {}
        for index in root.glob("*.index.json"):
            weight_map.update(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}))
        files = sorted({weight_map[n] for n in bad if n in weight_map})
        files = files or [f.name for g in WEIGHT_PATTERNS for f in sorted(root.glob(g))]
        where = ", ".join(str(root / f) for f in files[:3]) or source
    raise CheckpointError(f"{where}: non-finite weights (NaN or inf) in {len(bad)} tensor(s), e.g. {bad[:3]}: "
                          "refusing to load this checkpoint")


def load_policy(path: str | Path, cfg: ModelConfig, device: str | torch.device = "cpu"):
    """Load (model, tokenizer) from an HF directory or hub name; fails with the path named on a bad checkpoint
    (missing model or tokenizer files, non-finite weights, an encoder, a tokenizer without the protocol tags)."""
    from transformers import AutoModelForCausalLM

    source = str(path)
    check_checkpoint_files(path)
    try:
        tokenizer = _load_tokenizer(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=_DTYPES[cfg.dtype])
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"{source}: cannot load a causal LM checkpoint: {err}") from None
    if model.config.model_type in _ENCODER_ONLY and not getattr(model.config, "is_decoder", False):
        raise ConfigError(f"{source}: a {model.config.model_type} checkpoint is an encoder (bidirectional "
                          "attention), not a causal LM; the policy must be a decoder such as Qwen2")
    check_finite_weights(model, source)
    check_tokenizer(tokenizer, source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise ConfigError(f"{source}: model embeds {model.get_input_embeddings().num_embeddings} tokens but the "
                          f"tokenizer has {len(tokenizer)} (mismatched checkpoint)")
    return model.to(device), tokenizer
