"""Architecture knowledge, in one table.

Everything the passes need to know about a model family lives here: where its
decoder layers are, which linear modules write into each residual-stream site,
and which module's output *is* the site (where true activation addition hooks).
Passes look things up here; they never branch on ``model_type``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import LoraCompileError

SITES = ("resid_post", "resid_mid", "resid_pre")
SITE_MEANING = {
    "resid_post": "output of decoder layer L (hidden_states[L+1] in Hugging Face)",
    "resid_mid": "residual stream after the attention of layer L, before its MLP",
    "resid_pre": "input of decoder layer 0 = the embedding output (hidden_states[0]); layer 0 only",
}


@dataclass(frozen=True)
class SiteSpec:
    """How one residual-stream site is written to in an architecture.

    ``writers``: linear modules whose outputs are added straight into the residual
    stream at this site (templates with ``{L}``); the LoRA goes on them.
    ``hook``: the module whose output equals the residual stream delta at this site,
    i.e. where true activation addition adds the vector.
    ``embedding``: the writer is the token embedding. Its input is a one-hot token, so
    ``b = 1`` (all ones over the vocabulary) gives ``b·x = 1`` for every token: the
    compiled delta is exact and nothing is fitted (an embedding LoRA, DESIGN §3).
    ``layers``: the only layers the site exists at (None: every layer).
    ``attention``, ``values``: for a site written by attention, the attention module and
    its value projection, the other route in (a LoRA on ``values`` reaches the site
    averaged over tokens by the attention weights; ``fit.value_route``). ``pattern``: that
    attention's query and key projections, which set the attention weights: LoRAs there (B = 0
    at the start) let refinement follow how a vector added below changes the pattern (the
    next-layer route).
    Several ``writers`` (parallel blocks: attention and MLP both add into ``resid_post``):
    one direction is fitted over their concatenated inputs and split between them, each
    writer's LoRA with the same B, so the deltas add up to ``(b·x) s``.
    Unless ``post_norm`` is set, a LoRA delta on the writers reaches the residual stream
    unchanged (nothing between the writers' outputs and the stream but dropout and the residual
    sum), so the compiled adapter adds ``(b·x) s`` exactly; its only error is ``b·x − 1``.
    """

    writers: tuple[str, ...]
    hook: str
    embedding: bool = False
    layers: tuple[int, ...] | None = None
    attention: str | None = None
    values: str | None = None
    pattern: tuple[str, ...] = ()
    # Post-writer norms (Gemma 2/3, OLMo 2: ``x + post_norm(writer(h))``): the RMSNorm that
    # normalises the writers' output before it joins the stream. A LoRA delta there is not
    # additive, so compiling such a site is approximate (README "Post-writer norms").
    post_norm: str | None = None
    # An embedding module whose output is multiplied by a scale (Gemma: ``embed · √d``): the
    # attribute holding it. PEFT and servers multiply the embedding LoRA's output by it too.
    embed_scale: str | None = None

    @property
    def approximate(self) -> bool:
        """A LoRA delta on the writers reaches the stream only through a norm: not exactly additive."""
        return self.post_norm is not None


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    layers: str  # dotted path of the ModuleList of decoder layers
    num_layers_key: str
    hidden_size_key: str
    heads_key: str = "num_attention_heads"
    kv_heads_key: str = "num_key_value_heads"
    sites: dict[str, SiteSpec] = field(default_factory=dict)
    # The short names of this family's linear modules that LoRA servers take adapters on (the
    # serving-target linter's vocabulary for the family; fused projections under their fused name).
    lora_modules: frozenset[str] = frozenset()
    # Writers store their weight as [in, out] (GPT-2's Conv1D): PEFT's ``fan_in_fan_out: true``.
    fan_in_fan_out: bool = False
    # Which configs of these model types the entry describes (e.g. Falcon's parallel or sequential
    # block): the first entry whose predicate holds is the model's. None: every config.
    applies: Callable[[Any], bool] | None = None
    # Set for a config variant the compiler refuses as a whole: the reason (e.g. OPT's post-LN).
    unsupported: str | None = None
    # Sites this family has in the residual stream but a LoRA cannot write exactly: site -> reason.
    refused_sites: Mapping[str, str] = field(default_factory=dict)
    notes: str = ""  # what a user should know (README's table)
    # Gain of the post-writer norms: ``norm_gain_offset + weight`` (Gemma's RMSNorm: 1 + w; OLMo 2: w).
    norm_gain_offset: float = 0.0
    norm_eps_key: str = "rms_norm_eps"
    # The model's forward takes ``inputs_embeds`` as the residual stream as it is (no scaling, no
    # position embeddings added), so running the decoder layers from L on cached inputs of layer L
    # gives the full model's logits: refinement then skips the layers below the first steered one.
    embeds_are_stream: bool = False

    def site(self, site: str) -> SiteSpec:
        if site in self.refused_sites:
            raise LoraCompileError(f"site {site!r} is refused for {self.name}: {self.refused_sites[site]}")
        if site not in self.sites:
            raise LoraCompileError(
                f"site {site!r} is not supported for {self.name}; use one of: " + ", ".join(self.sites)
            )
        return self.sites[site]

    def site_at(self, site: str, layer: int) -> SiteSpec:
        """The site's entry, refusing layers the site does not exist at."""
        spec = self.site(site)
        if spec.layers is not None and layer not in spec.layers:
            raise LoraCompileError(
                f"site {site!r} exists only at layer(s) {', '.join(map(str, spec.layers))}, not {layer}: "
                f"for later layers use resid_post L-1 (the input of layer L)"
            )
        return spec

    def writers(self, site: str, layer: int) -> tuple[str, ...]:
        return tuple(w.format(L=layer) for w in self.site_at(site, layer).writers)

    def attention_route(self, site: str, layer: int) -> tuple[str, str]:
        """(attention module, its value projection) through which ``site`` can also be written."""
        spec = self.site_at(site, layer)
        if spec.attention is None or spec.values is None:
            raise LoraCompileError(f"site {site!r} of {self.name} is not written by attention: no value route")
        return spec.attention.format(L=layer), spec.values.format(L=layer)

    def pattern_modules(self, site: str, layer: int) -> tuple[str, ...]:
        """The query/key projections of the attention writing ``site`` (empty where the table has none)."""
        return tuple(m.format(L=layer) for m in self.site_at(site, layer).pattern)

    def hook_module(self, site: str, layer: int) -> str:
        return self.site_at(site, layer).hook.format(L=layer)

    def post_norm(self, site: str, layer: int) -> str | None:
        """The norm between the site's writers and the stream (None: the writers add straight in)."""
        spec = self.site_at(site, layer)
        return None if spec.post_norm is None else spec.post_norm.format(L=layer)

    def approximate_reason(self, site: str) -> str | None:
        """Why compiling ``site`` is only approximate (one line), or None where it is exact-additive."""
        spec = self.site(site)
        if not spec.approximate:
            return None
        writers = ", ".join(w.rsplit(".", 1)[-1] for w in spec.writers)
        norm = spec.post_norm.rsplit(".", 1)[-1]
        return (
            f"{site} of {self.name} is written through a post-writer norm ({norm} after {writers}): "
            "the LoRA's delta is normalised before it joins the residual stream, so the compiled "
            "steering only approximates true addition"
        )

    def fitted_sites(self) -> list[str]:
        """Sites whose compiled delta comes from a fitted direction (what ``scan`` maps)."""
        return [name for name, spec in self.sites.items() if not spec.embedding]

    def layer_module(self, layer: int) -> str:
        return f"{self.layers}.{layer}"


_LLAMA_SITES = {
    "resid_post": SiteSpec(writers=("model.layers.{L}.mlp.down_proj",), hook="model.layers.{L}.mlp.down_proj"),
    "resid_mid": SiteSpec(
        writers=("model.layers.{L}.self_attn.o_proj",),
        hook="model.layers.{L}.self_attn.o_proj",
        attention="model.layers.{L}.self_attn",
        values="model.layers.{L}.self_attn.v_proj",
        pattern=("model.layers.{L}.self_attn.q_proj", "model.layers.{L}.self_attn.k_proj"),
    ),
    "resid_pre": SiteSpec(writers=("model.embed_tokens",), hook="model.embed_tokens", embedding=True, layers=(0,)),
}
_LLAMA_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})


def _sequential_sites(layers: str, attn_out: str, mlp_out: str, embedding: str | None) -> dict[str, SiteSpec]:
    """A pre-norm block ``h += attn(norm(h)); h += mlp(norm(h))``: one writer per site."""
    sites = {
        "resid_post": SiteSpec(writers=(f"{layers}.{{L}}.{mlp_out}",), hook=f"{layers}.{{L}}.{mlp_out}"),
        "resid_mid": SiteSpec(writers=(f"{layers}.{{L}}.{attn_out}",), hook=f"{layers}.{{L}}.{attn_out}"),
    }
    if embedding is not None:
        sites["resid_pre"] = SiteSpec(writers=(embedding,), hook=embedding, embedding=True, layers=(0,))
    return sites


def _parallel_sites(layers: str, attn_out: str, mlp_out: str, embedding: str) -> dict[str, SiteSpec]:
    """A parallel block ``h += attn(norm(h)) + mlp(norm'(h))``: both write ``resid_post``; no ``resid_mid``.

    The block has no point between attention and MLP in its residual stream, so there is no
    ``resid_mid`` site. True addition hooks the MLP's writer: its output joins the layer's output
    unchanged (``hidden_states[L+1]``), as the attention writer's does.
    """
    return {
        "resid_post": SiteSpec(
            writers=(f"{layers}.{{L}}.{attn_out}", f"{layers}.{{L}}.{mlp_out}"), hook=f"{layers}.{{L}}.{mlp_out}"
        ),
        "resid_pre": SiteSpec(writers=(embedding,), hook=embedding, embedding=True, layers=(0,)),
    }


_PARALLEL_NO_MID = (
    "attention and MLP run in parallel on the same input, so the residual stream has no point "
    "between them: use resid_post (both writers, fitted jointly)"
)
_MOE_POST = (
    "the MLP is a mixture of experts: each routed expert's down_proj would need its own LoRA (the "
    "experts are 3-D parameters, not linear modules, in transformers, and few servers take LoRA on "
    "experts), and the delta would be exact only where the router weights of the chosen experts sum "
    "to 1 (Qwen MoE without norm_topk_prob: they do not; its shared expert is sigmoid-gated): use resid_mid"
)


def _falcon_parallel(config: Any) -> bool:
    return bool(getattr(config, "new_decoder_architecture", False) or getattr(config, "parallel_attn", True))


def _opt_embeddings_projected(config: Any) -> bool:
    return getattr(config, "word_embed_proj_dim", None) not in (None, getattr(config, "hidden_size", None))


# Gemma 2/3 and OLMo 2: every writer's output goes through its own RMSNorm before the residual add.
# The hooks are those norms (their output is the stream's delta); no value route (it too would
# pass through the norm). Gemma's embedding multiplies by √d (``embed_scale``); OLMo 2's does not.
_GEMMA_SITES = {
    "resid_post": SiteSpec(
        writers=("model.layers.{L}.mlp.down_proj",),
        hook="model.layers.{L}.post_feedforward_layernorm",
        post_norm="model.layers.{L}.post_feedforward_layernorm",
    ),
    "resid_mid": SiteSpec(
        writers=("model.layers.{L}.self_attn.o_proj",),
        hook="model.layers.{L}.post_attention_layernorm",
        post_norm="model.layers.{L}.post_attention_layernorm",
    ),
    "resid_pre": SiteSpec(
        writers=("model.embed_tokens",),
        hook="model.embed_tokens",
        embedding=True,
        layers=(0,),
        embed_scale="embed_scale",
    ),
}
_OLMO2_SITES = {
    **{k: v for k, v in _GEMMA_SITES.items() if k != "resid_pre"},
    "resid_pre": _LLAMA_SITES["resid_pre"],
}

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        name="llama-family",
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        layers="model.layers",
        num_layers_key="num_hidden_layers",
        hidden_size_key="hidden_size",
        sites=_LLAMA_SITES,
        lora_modules=_LLAMA_MODULES,
        embeds_are_stream=True,
    ),
    Architecture(
        name="phi3",
        model_types=("phi3",),
        layers="model.layers",
        num_layers_key="num_hidden_layers",
        hidden_size_key="hidden_size",
        # Fused qkv_proj and gate_up_proj feed attention and the MLP; the writers are still o_proj / down_proj.
        sites=_sequential_sites("model.layers", "self_attn.o_proj", "mlp.down_proj", "model.embed_tokens"),
        lora_modules=frozenset({"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
        notes="fused qkv_proj / gate_up_proj; no value route (v_proj is fused into qkv_proj)",
    ),
    Architecture(
        name="moe",
        model_types=("mixtral", "qwen2_moe", "qwen3_moe"),
        layers="model.layers",
        num_layers_key="num_hidden_layers",
        hidden_size_key="hidden_size",
        sites={k: v for k, v in _LLAMA_SITES.items() if k != "resid_post"},
        lora_modules=frozenset({"q_proj", "k_proj", "v_proj", "o_proj"}),
        refused_sites={"resid_post": _MOE_POST},
        notes="resid_post refused (mixture-of-experts MLP)",
    ),
    Architecture(
        name="gpt2",
        model_types=("gpt2",),
        layers="transformer.h",
        num_layers_key="n_layer",
        hidden_size_key="n_embd",
        heads_key="n_head",
        # The position embedding (wpe) is added beside wte: a LoRA on wte still adds s to every token.
        sites=_sequential_sites("transformer.h", "attn.c_proj", "mlp.c_proj", "transformer.wte"),
        lora_modules=frozenset({"c_attn", "c_proj", "c_fc"}),
        fan_in_fan_out=True,
        notes="Conv1D writers (weights [in, out]): adapters say fan_in_fan_out: true",
    ),
    Architecture(
        name="gpt-neox-parallel",
        model_types=("gpt_neox",),
        layers="gpt_neox.layers",
        num_layers_key="num_hidden_layers",
        hidden_size_key="hidden_size",
        sites=_parallel_sites("gpt_neox.layers", "attention.dense", "mlp.dense_4h_to_h", "gpt_neox.embed_in"),
        lora_modules=frozenset({"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}),
        applies=lambda config: bool(getattr(config, "use_parallel_residual", True)),
        refused_sites={"resid_mid": _PARALLEL_NO_MID},
        notes="use_parallel_residual: true (Pythia)",
    ),
    Architecture(
        name="gpt-neox-sequential",
        model_types=("gpt_neox",),
        layers="gpt_neox.layers",
        num_layers_key="num_hidden_layers",
        hidden_size_key="hidden_size",
        sites=_sequential_sites("gpt_neox.layers", "attention.dense", "mlp.dense_4h_to_h", "gpt_neox.embed_in"),
        lora_modules=frozenset({"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}),
        notes="use_parallel_residual: false",
    ),
    Architecture(
        name="gptj",
        model_types=("gptj",),
        layers="transformer.h",
        num_layers_key="n_layer",
        hidden_size_key="n_embd",
        heads_key="n_head",
        sites=_parallel_sites("transformer.h", "attn.out_proj", "mlp.fc_out", "transformer.wte"),
        lora_modules=frozenset({"q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"}),
        refused_sites={"resid_mid": _PARALLEL_NO_MID},
    ),
    Architecture(
        name="phi",
        model_types=("phi",),
        layers="model.layers",
        num_layers_key="num_hidden_layers",
        hidden_size_key="hidden_size",
        sites=_parallel_sites("model.layers", "self_attn.dense", "mlp.fc2", "model.embed_tokens"),
        lora_modules=frozenset({"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"}),
        refused_sites={"resid_mid": _PARALLEL_NO_MID},
        notes="Phi-1, Phi-1.5, Phi-2",
    ),
    Architecture(
        name="opt-post-ln",
        model_types=("opt",),
        layers="model.decoder.layers",
        num_layers_key="num_hidden_layers",
        hidden_size_key="hidden_size",
        applies=lambda config: not getattr(config, "do_layer_norm_before", True),
        unsupported=(
            "do_layer_norm_before is false (post-LN, e.g. OPT-350m): each block's output is layer-normalised "
            "after the residual sum, so no writer's LoRA delta is an additive delta to the stream"
        ),
    ),
    Architecture(
        name="opt",
        model_types=("opt",),
        layers="model.decoder.layers",
        num_layers_key="num_hidden_layers",
        hidden_size_key="hidden_size",
        sites=_sequential_sites("model.decoder.layers", "self_attn.out_proj", "fc2", "model.decoder.embed_tokens"),
        lora_modules=frozenset({"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}),
        applies=lambda config: not _opt_embeddings_projected(config),
        notes="do_layer_norm_before: true only (post-LN refused)",
    ),
    Architecture(
        name="opt-projected-embeddings",
        model_types=("opt",),
        layers="model.decoder.layers",
        num_layers_key="num_hidden_layers",
        hidden_size_key="hidden_size",
        sites=_sequential_sites("model.decoder.layers", "self_attn.out_proj", "fc2", None),
        lora_modules=frozenset({"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}),
        refused_sites={
            "resid_pre": "the token embedding is narrower than the stream (word_embed_proj_dim) and "
            "project_in maps it: an embedding LoRA adds project_in(s'), not s. Use resid_post or resid_mid"
        },
        notes="word_embed_proj_dim ≠ hidden_size (OPT-350m style): no resid_pre",
    ),
    Architecture(
        name="falcon-parallel",
        model_types=("falcon",),
        layers="transformer.h",
        num_layers_key="num_hidden_layers",
        hidden_size_key="hidden_size",
        sites=_parallel_sites(
            "transformer.h", "self_attention.dense", "mlp.dense_4h_to_h", "transformer.word_embeddings"
        ),
        lora_modules=frozenset({"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}),
        applies=_falcon_parallel,
        refused_sites={"resid_mid": _PARALLEL_NO_MID},
        notes="parallel_attn or new_decoder_architecture (Falcon-7B/40B/180B)",
    ),
    Architecture(
        name="falcon-sequential",
        model_types=("falcon",),
        layers="transformer.h",
        num_layers_key="num_hidden_layers",
        hidden_size_key="hidden_size",
        sites=_sequential_sites(
            "transformer.h", "self_attention.dense", "mlp.dense_4h_to_h", "transformer.word_embeddings"
        ),
        lora_modules=frozenset({"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}),
        notes="parallel_attn: false and not new_decoder_architecture",
    ),
    # Gemma 3 text-only (270M, 1B; what a Gemma 3 GGUF loads as). The multimodal ``gemma3``
    # (Gemma3ForConditionalGeneration: layers under model.language_model) is not in the table.
    Architecture(
        name="gemma2/gemma3",
        model_types=("gemma2", "gemma3_text"),
        layers="model.layers",
        num_layers_key="num_hidden_layers",
        hidden_size_key="hidden_size",
        sites=_GEMMA_SITES,
        lora_modules=_LLAMA_MODULES,
        norm_gain_offset=1.0,
        notes="post-writer norms: resid_mid/resid_post approximate (--approximate); embedding scaled by √d",
    ),
    Architecture(
        name="olmo2",
        model_types=("olmo2",),
        layers="model.layers",
        num_layers_key="num_hidden_layers",
        hidden_size_key="hidden_size",
        sites=_OLMO2_SITES,
        lora_modules=_LLAMA_MODULES,
        notes="post-writer norms: resid_mid/resid_post approximate (--approximate)",
    ),
)


def check_site_name(site: str) -> str:
    """``site`` if it names a residual-stream site, else a one-line error listing them."""
    if site not in SITES:
        raise LoraCompileError(f"unknown site {site!r}: use one of {', '.join(SITES)}")
    return site


def supported_model_types() -> list[str]:
    return sorted({t for a in ARCHITECTURES if a.unsupported is None for t in a.model_types})


def architecture_for(model_type: str, config: Any = None) -> Architecture:
    """The table's entry for a model: by ``model_type``, then by ``config`` where the family's blocks vary.

    Without ``config``, the first entry of the model type (its usual variant). A variant the
    compiler refuses (``unsupported``) raises with the reason; an unknown type names the known ones.
    """
    candidates = [a for a in ARCHITECTURES if model_type in a.model_types]
    if not candidates:
        raise LoraCompileError(
            f"unsupported architecture {model_type!r}; supported model types: " + ", ".join(supported_model_types())
        )
    if config is not None:
        candidates = [a for a in candidates if a.applies is None or a.applies(config)] or candidates[-1:]
    else:
        candidates = [a for a in candidates if a.unsupported is None] or candidates
    arch = candidates[0]
    if arch.unsupported is not None:
        raise LoraCompileError(f"unsupported {model_type} model: {arch.unsupported}")
    return arch


def is_transposed(module: nn.Module) -> bool:
    """The module keeps its weight as [in, out] (``transformers.pytorch_utils.Conv1D``, GPT-2's)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def module_features(module: nn.Module) -> tuple[int, int] | None:
    """(input size, output size) of a module a LoRA can target (vocabulary and hidden size of an embedding)."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_transposed(module):
        rows, cols = module.weight.shape
        return int(rows), int(cols)
    return None


def writer_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a writer module; a one-line error for a module no LoRA takes."""
    features = module_features(module)
    if features is None:
        raise LoraCompileError(f"{type(module).__name__} is not a linear module: no LoRA can be compiled onto it")
    return features
