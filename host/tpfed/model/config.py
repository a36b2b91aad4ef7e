"""Model geometry shared by the loader, the planner, the coordinator and the simulator."""

from __future__ import annotations

from dataclasses import asdict, dataclass

_CHOICES = {
    "norm": ("rms", "layer"),
    "norm_position": ("pre", "post"),
    "activation": ("silu", "gelu_tanh", "gelu"),
    "position": ("rope", "learned"),
    "rope_scaling": ("", "linear", "llama3"),
}


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a decoder (or encoder) transformer, as far as splitting it is concerned.

    ``mlp_matrices`` is 3 for a gated MLP (SwiGLU: w1, w3, w2) and 2 for a plain one (GELU:
    up, down). A KV group is one KV head with the ``group_size`` query heads that share it
    (plain multi-head attention: a group is one head).

    The fields after ``name`` describe the architecture beyond its shape. Their defaults are
    llama2.c's Llama, so a config built from the shape alone means what it always did:

    - ``norm``: ``"rms"`` (RMSNorm, weight only) or ``"layer"`` (LayerNorm, weight and bias);
      ``norm_position``: ``"pre"`` (normalise the sublayer's input: Llama, GPT-2) or ``"post"``
      (normalise the residual after adding the sublayer's output: BERT).
    - ``activation``: ``"silu"`` (SwiGLU when ``mlp_matrices`` is 3), ``"gelu_tanh"`` (GPT-2's
      ``gelu_new``) or ``"gelu"`` (exact, erf).
    - ``qkv_bias``, ``o_bias``, ``mlp_bias``: which linear layers carry a bias.
    - ``position``: ``"rope"`` (rotary, on interleaved pairs as llama2.c; Hugging Face's
      half-split layout is permuted into it at load time) or ``"learned"`` (a position
      embedding table of ``seq_len`` rows added to the token embedding).
    - ``rope_scaling``: ``""`` (none), ``"linear"`` or ``"llama3"``, with ``rope_factor``,
      ``rope_low_freq_factor``, ``rope_high_freq_factor`` and ``rope_original_max_pos``.
    - ``sliding_window``: 0, or the number of most recent positions a query attends to
      (Mistral: position i sees j with i - j < window).
    - ``causal``: False for an encoder (BERT: every position sees every other).
    - ``type_vocab_size``: rows of the token-type embedding (BERT), 0 for none.
    - ``bos_id``, ``eos_id``: special token ids (-1: the model has none).
    """

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    shared_classifier: bool = True
    mlp_matrices: int = 3
    arch: str = "llama"
    name: str = ""
    norm: str = "rms"
    norm_position: str = "pre"
    activation: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    position: str = "rope"
    rope_scaling: str = ""
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_pos: int = 0
    sliding_window: int = 0
    causal: bool = True
    type_vocab_size: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        for field, allowed in _CHOICES.items():
            if getattr(self, field) not in allowed:
                raise ValueError(
                    f"model config: {field} must be one of {', '.join(repr(a) for a in allowed)}, "
                    f"got {getattr(self, field)!r}"
                )
        if self.sliding_window < 0 or self.type_vocab_size < 0:
            raise ValueError("model config: sliding_window and type_vocab_size must be >= 0")
        if self.mlp_matrices not in (2, 3):
            raise ValueError(f"model config: mlp_matrices must be 2 or 3, got {self.mlp_matrices}")
        for field in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"):
            if getattr(self, field) <= 0:
                raise ValueError(f"model config: {field} must be positive, got {getattr(self, field)}")
        if self.dim % self.n_heads:
            raise ValueError(f"model config: dim {self.dim} is not a multiple of n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model config: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}"
            )

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_size

    @property
    def group_size(self) -> int:
        """Query heads per KV group."""
        return self.n_heads // self.n_kv_heads

    @property
    def n_groups(self) -> int:
        return self.n_kv_heads

    @property
    def group_q_dim(self) -> int:
        """Width of one group's attention output (its query heads times head size)."""
        return self.group_size * self.head_size

    def to_dict(self) -> dict:
        return asdict(self)
