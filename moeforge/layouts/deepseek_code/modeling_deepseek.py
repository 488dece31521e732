"""DeepSeek-MoE v1 (deepseek-moe-16b's architecture) for transformers, with eager attention.

Written beside the weights of every DeepSeek output (config.json's `auto_map` names it), so that
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` needs no Hub access. It computes what
deepseek-moe-16b's own code computes: a Llama decoder (RMSNorm, RoPE with optional linear/dynamic scaling,
grouped-query attention, SwiGLU) whose MLP is, in MoE layers, a softmax router over `n_routed_experts` with
top-`num_experts_per_tok` selection (renormalised when `norm_topk_prob`, top-1 included, as vLLM does)
plus `n_shared_experts` ungated shared experts stored as one MLP. A layer is MoE from `first_k_dense_replace`
on, every `moe_layer_freq`-th layer. There is no auxiliary load-balancing loss.
Runs under transformers 4.46+ and 5.x.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_deepseek import DeepseekConfig


class DeepseekRMSNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotary_cos_sin(config, head_dim, position_ids, dtype):
    """cos and sin (batch, seq, head_dim) of each position: plain, linear or dynamic-NTK scaled RoPE."""
    base, positions = config.rope_theta, position_ids.float()
    scaling = config.rope_scaling or {}
    kind = scaling.get("type", scaling.get("rope_type", "default"))
    if kind == "linear":
        positions = positions / scaling["factor"]
    elif kind == "dynamic":
        factor, seq_len, trained = scaling["factor"], int(position_ids.max()) + 1, config.max_position_embeddings
        if seq_len > trained:
            base = base * (factor * seq_len / trained - (factor - 1)) ** (head_dim / (head_dim - 2))
    elif kind != "default":
        raise ValueError(f"rope_scaling type {kind!r}: DeepSeek-MoE v1 knows linear and dynamic")
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim)
    angles = positions[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def attention_bias(attention_mask, query_len, past_len, dtype, device):
    """Additive (batch or 1, 1, query, key) mask: causal, and padded keys (attention_mask 0) hidden."""
    if attention_mask is not None and attention_mask.dim() == 4:  # already expanded by the caller
        if attention_mask.dtype == torch.bool:
            return torch.zeros(attention_mask.shape, dtype=dtype, device=device).masked_fill(
                ~attention_mask, torch.finfo(dtype).min)
        return attention_mask.to(dtype)
    key_len = past_len + query_len
    keys = torch.arange(key_len, device=device)
    allowed = (keys[None, :] <= torch.arange(past_len, key_len, device=device)[:, None])[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, -key_len:].bool()
    # a large finite value: a query whose keys are all padding gets uniform weights, not NaN
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


class DeepseekAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.dropout = config.attention_dropout
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, x, cos, sin, mask, cache):
        batch, length, _ = x.shape
        q, k, v = (proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        cos, sin = cos[:, None], sin[:, None]
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = q @ k.transpose(2, 3) / math.sqrt(self.head_dim) + mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = F.dropout(probs, p=self.dropout, training=self.training)
        return self.o_proj((probs @ v).transpose(1, 2).reshape(batch, length, -1))


class DeepseekMLP(nn.Module):
    def __init__(self, config, intermediate_size):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DeepseekMoE(nn.Module):
    """Routed experts chosen by a softmax router, plus the ungated shared experts (one MLP)."""

    def __init__(self, config):
        super().__init__()
        if config.scoring_func != "softmax":
            raise ValueError(f"scoring_func {config.scoring_func!r}: DeepSeek-MoE v1 scores with softmax")
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.n_routed_experts, bias=False)
        self.experts = nn.ModuleList(
            DeepseekMLP(config, config.moe_intermediate_size) for _ in range(config.n_routed_experts))
        if config.n_shared_experts:  # None and 0 both mean none
            self.shared_experts = DeepseekMLP(config, config.moe_intermediate_size * config.n_shared_experts)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        scores = torch.softmax(self.gate(flat), dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(scores, self.top_k, dim=-1)
        if self.norm_topk_prob:  # top-1 too (deepseek-moe-16b's code skips it there; vLLM does not)
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel():
                out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
        out = out.view(x.shape)
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(x)
        return out


def is_moe_layer(config, layer_idx):
    return (config.n_routed_experts is not None and layer_idx >= config.first_k_dense_replace
            and layer_idx % config.moe_layer_freq == 0)


class DeepseekDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.self_attn = DeepseekAttention(config, layer_idx)
        self.mlp = DeepseekMoE(config) if is_moe_layer(config, layer_idx) else DeepseekMLP(config, config.intermediate_size)
        self.input_layernorm = DeepseekRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = DeepseekRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepseekPreTrainedModel(PreTrainedModel):
    config_class = DeepseekConfig
    base_model_prefix = "model"
    _no_split_modules = ["DeepseekDecoderLayer"]
    _supports_cache_class = True  # transformers 4.x: generate() hands us a DynamicCache

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, DeepseekRMSNorm):
            nn.init.ones_(module.weight)


class DeepseekModel(DeepseekPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DeepseekDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DeepseekRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def decode(self, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache, **kwargs):
        """(last hidden state, cache or None, hidden states entering each layer plus the last)."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        # transformers 5 passes the cache as `cache`, 4.x as `past_key_values`
        cache = kwargs["cache"] if kwargs.get("cache") is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is not None and not isinstance(cache, Cache):  # 4.x legacy tuples
            cache = DynamicCache.from_legacy_cache(cache)
        if use_cache and cache is None:
            cache = DynamicCache()
        past_len = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + x.shape[1], device=x.device)[None]
        mask = attention_bias(attention_mask, x.shape[1], past_len, x.dtype, x.device)
        cos, sin = rotary_cos_sin(self.config, self.layers[0].self_attn.head_dim, position_ids, x.dtype)
        hidden = []
        for layer in self.layers:
            hidden.append(x)
            x = layer(x, cos, sin, mask, cache if use_cache else None)
        x = self.norm(x)
        return x, cache if use_cache else None, tuple(hidden) + (x,)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_hidden_states=None, return_dict=None, **kwargs):
        x, cache, hidden = self.decode(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds,
                                       use_cache, **kwargs)
        # positional: the cache field is `past_key_values` in transformers 4.x and `cache` in 5.x
        out = BaseModelOutputWithPast(x, cache, hidden if output_hidden_states else None)
        return out if return_dict is not False else out.to_tuple()


class DeepseekForCausalLM(DeepseekPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # used when tie_word_embeddings

    def __init__(self, config):
        super().__init__(config)
        self.model = DeepseekModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=None, return_dict=None,
                **kwargs):
        x, cache, hidden = self.model.decode(input_ids, attention_mask, position_ids, past_key_values,
                                             inputs_embeds, use_cache, **kwargs)
        logits = self.lm_head(x).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(logits.device))
        result = CausalLMOutputWithPast(loss, logits, cache, hidden if output_hidden_states else None)
        return result if return_dict is not False else result.to_tuple()
