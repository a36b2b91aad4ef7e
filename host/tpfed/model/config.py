"""Model geometry shared by the loader, the planner, the coordinator and the simulator."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a decoder (or encoder) transformer, as far as splitting it is concerned.

    ``mlp_matrices`` is 3 for a gated MLP (SwiGLU: w1, w3, w2) and 2 for a plain one (GELU:
    up, down). A KV group is one KV head with the ``group_size`` query heads that share it
    (plain multi-head attention: a group is one head).
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

    def __post_init__(self) -> None:
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
