"""Model shape, from a GPT-2 `config.json` (multi-exit checkpoints add `lm_head_layer_indices`)."""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
# GPT2Config fields that change the forward pass, with the value under which mexit refuses the checkpoint
# (the ones it implements are fields of ModelConfig).
REFUSED_FIELDS = {"add_cross_attention": True}


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a multi-exit GPT-2. `exit_layers` are 1-based block indices that carry an exit head."""

    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    n_positions: int
    layer_norm_epsilon: float = 1e-5
    exit_layers: tuple[int, ...] = ()
    eos_token_id: int | None = None
    n_inner: int | None = None  # MLP width; None: 4 * n_embd
    scale_attn_weights: bool = True  # scores scaled by 1/sqrt(head_dim)
    scale_attn_by_inverse_layer_idx: bool = False  # and by 1/(block index + 1) (Mistral / Stanford CRFM GPT-2s)
    reorder_and_upcast_attn: bool = False  # scores and softmax in fp32 (what mexit's attention does in half too)
    tie_word_embeddings: bool = True  # False: the original head is the checkpoint's own lm_head.weight

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_inner is not None and self.n_inner < 1:
            raise ValueError(f"n_inner must be >= 1, got {self.n_inner}")
        bad = [layer for layer in self.exit_layers if not 1 <= layer <= self.n_layer]
        if bad:
            raise ValueError(f"exit layers {bad} are outside 1..n_layer={self.n_layer}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def attn_scale(self, block: int) -> float:
        """Attention score scale of block `block` (0-based), as transformers' GPT2Attention computes it."""
        scale = self.head_dim**-0.5 if self.scale_attn_weights else 1.0
        return scale / (block + 1) if self.scale_attn_by_inverse_layer_idx else scale

    @classmethod
    def from_hf(cls, hf_config) -> ModelConfig:
        """Build from a transformers `GPT2Config` (multi-exit checkpoints add `lm_head_layer_indices`)."""
        if getattr(hf_config, "model_type", "gpt2") != "gpt2":
            raise ValueError(f"unsupported model_type {hf_config.model_type!r}: mexit runs GPT-2 checkpoints")
        act = getattr(hf_config, "activation_function", "gelu_new")
        if act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"unsupported activation_function {act!r}; expected one of {SUPPORTED_ACTIVATIONS}")
        for name, refused in REFUSED_FIELDS.items():
            if getattr(hf_config, name, None) == refused:
                raise ValueError(f"config.json sets {name}={refused!r}, which mexit does not implement")
        listed = getattr(hf_config, "lm_head_layer_indices", None) or ()
        if not isinstance(listed, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in listed):
            raise ValueError(f"lm_head_layer_indices must be a list of layer numbers, got {listed!r}")
        exits = tuple(sorted(listed))
        n_inner = getattr(hf_config, "n_inner", None)
        return cls(
            n_layer=hf_config.n_layer,
            n_embd=hf_config.n_embd,
            n_head=hf_config.n_head,
            vocab_size=hf_config.vocab_size,
            n_positions=hf_config.n_positions,
            layer_norm_epsilon=hf_config.layer_norm_epsilon,
            exit_layers=exits,
            eos_token_id=getattr(hf_config, "eos_token_id", None),
            n_inner=None if n_inner is None or n_inner == 4 * hf_config.n_embd else int(n_inner),
            scale_attn_weights=bool(getattr(hf_config, "scale_attn_weights", True)),
            scale_attn_by_inverse_layer_idx=bool(getattr(hf_config, "scale_attn_by_inverse_layer_idx", False)),
            reorder_and_upcast_attn=bool(getattr(hf_config, "reorder_and_upcast_attn", False)),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
        )

    def to_hf(self):
        """The transformers `GPT2Config` this shape saves as (with `lm_head_layer_indices` when it has exits)."""
        from transformers import GPT2Config

        hf = GPT2Config(
            n_layer=self.n_layer, n_embd=self.n_embd, n_head=self.n_head, vocab_size=self.vocab_size,
            n_positions=self.n_positions, layer_norm_epsilon=self.layer_norm_epsilon,
            activation_function="gelu_new", eos_token_id=self.eos_token_id, bos_token_id=self.eos_token_id,
            n_inner=self.n_inner, scale_attn_weights=self.scale_attn_weights,
            scale_attn_by_inverse_layer_idx=self.scale_attn_by_inverse_layer_idx,
            reorder_and_upcast_attn=self.reorder_and_upcast_attn, tie_word_embeddings=self.tie_word_embeddings,
        )
        if self.exit_layers:
            hf.lm_head_layer_indices = list(self.exit_layers)
        return hf


GPT2_MEDIUM_MULTIEXIT = ModelConfig(
    n_layer=24, n_embd=1024, n_head=16, vocab_size=50257, n_positions=1024,
    exit_layers=tuple(range(2, 25, 2)), eos_token_id=50256,
)
