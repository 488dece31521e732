"""DeepSeek-MoE v1 configuration (model_type "deepseek"): deepseek-moe-16b's keys and defaults.

Written beside the weights of every DeepSeek output (config.json's `auto_map` names it), so that
`trust_remote_code=True` loads the checkpoint with no Hub access. Runs under transformers 4.46+ and 5.x.
"""
import warnings

from transformers import PretrainedConfig


class DeepseekConfig(PretrainedConfig):
    model_type = "deepseek"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=102400,
        hidden_size=4096,
        intermediate_size=11008,
        moe_intermediate_size=1407,
        num_hidden_layers=30,
        num_attention_heads=32,
        num_key_value_heads=32,
        head_dim=None,  # None: hidden_size // num_attention_heads
        n_shared_experts=None,  # None or 0: no shared experts
        n_routed_experts=None,  # None: every layer dense
        num_experts_per_tok=None,
        moe_layer_freq=1,
        first_k_dense_replace=0,
        norm_topk_prob=False,
        scoring_func="softmax",
        aux_loss_alpha=0.001,
        seq_aux=True,
        hidden_act="silu",
        max_position_embeddings=2048,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        pad_token_id=None,
        bos_token_id=100000,
        eos_token_id=100001,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        rope_scaling=None,  # {"type": "linear" | "dynamic", "factor": f}
        attention_bias=False,
        attention_dropout=0.0,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim
        self.n_shared_experts = n_shared_experts
        self.n_routed_experts = n_routed_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_layer_freq = moe_layer_freq
        self.first_k_dense_replace = first_k_dense_replace
        self.norm_topk_prob = norm_topk_prob
        self.scoring_func = scoring_func
        self.aux_loss_alpha = aux_loss_alpha
        self.seq_aux = seq_aux
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        # transformers 5 saves rope_scaling as rope_parameters (with rope_theta inside): read either
        parameters = kwargs.pop("rope_parameters", None) or {}
        self.rope_theta = parameters.get("rope_theta", rope_theta)
        with warnings.catch_warnings():  # transformers 5 keeps rope_scaling as rope_parameters, and says so
            warnings.simplefilter("ignore", FutureWarning)
            self.rope_scaling = _legacy_scaling(rope_scaling or parameters)
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    def to_dict(self):
        """deepseek-moe-16b's spelling of the RoPE keys, whatever transformers keeps them as."""
        out = super().to_dict()
        out.pop("rope_parameters", None)
        out["rope_scaling"] = _legacy_scaling(self.rope_scaling)
        return out


def _legacy_scaling(scaling):
    """{"type", "factor"} for linear/dynamic scaling; None for none."""
    kind = (scaling or {}).get("type", (scaling or {}).get("rope_type", "default"))
    return None if kind == "default" else {"type": kind, "factor": scaling["factor"]}
