"""Configuration for MiniCPM-1B / MiniCPM-2B / MiniCPM4 checkpoints (``model_type: minicpm``).

Field names follow the official ``config.json``. The legacy RoPE keys ``rope_theta`` and
``rope_scaling`` are accepted and turned into transformers 5's ``rope_parameters`` by the base
class, so an official config.json loads unchanged.
"""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters


@strict
class MiniCPMConfig(PreTrainedConfig):
    r"""
    Defaults match MiniCPM-2B. Beyond the usual Llama fields, MiniCPM has three muP scalings:

    scale_emb (`float`, defaults to 12):
        Input embeddings are multiplied by this.
    dim_model_base (`int`, defaults to 256):
        The final normed hidden states are divided by `hidden_size / dim_model_base` before the LM head.
    scale_depth (`float`, defaults to 1.4):
        Every residual branch (attention and MLP output) is multiplied by `scale_depth / sqrt(num_hidden_layers)`.
    """

    model_type = "minicpm"
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 122753
    hidden_size: int = 2304
    intermediate_size: int = 5760
    num_hidden_layers: int = 40
    num_attention_heads: int = 36
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.1
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = True
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_dropout: int | float | None = 0.0
    scale_emb: int | float = 12
    dim_model_base: int | float = 256
    scale_depth: int | float = 1.4

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Called by `@strict` validation."""
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})."
            )

    def to_dict(self):
        """Also under the official field names, ``rope_theta`` and ``rope_scaling`` (None for plain RoPE),
        which serving stacks and converters with native MiniCPM support read from config.json; loading
        the result gives the same ``rope_parameters``."""
        output = super().to_dict()
        rope = dict(output.get("rope_parameters") or {})
        if "rope_theta" in rope:
            output["rope_theta"] = rope.pop("rope_theta")
            output["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
        return output

    @property
    def residual_scale(self) -> float:
        """Factor applied to each attention / MLP output before it is added to the residual stream."""
        return self.scale_depth / self.num_hidden_layers**0.5

    @property
    def logits_scale(self) -> float:
        """The final hidden states are divided by this before the LM head."""
        return self.hidden_size / self.dim_model_base

    @property
    def logits_scaling(self) -> float:
        """The same divisor under the name transformers' MiniCPM3 config gives it, which TRL's fused LM head
        reads: without it TRL's DPO would score replies on logits hidden_size / dim_model_base times too large."""
        return self.logits_scale


__all__ = ["MiniCPMConfig"]
