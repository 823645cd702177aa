"""Architecture knowledge, in one table.

Everything the passes need to know about a model family lives here: where its
decoder layers are, which linear modules write into each residual-stream site,
and which module's output *is* the site (where true activation addition hooks).
Passes look things up here; they never branch on ``model_type``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    averaged over tokens by the attention weights; ``fit.value_route``).
    """

    writers: tuple[str, ...]
    hook: str
    embedding: bool = False
    layers: tuple[int, ...] | None = None
    attention: str | None = None
    values: str | None = None


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
    # The model's forward takes ``inputs_embeds`` as the residual stream as it is (no scaling, no
    # position embeddings added), so running the decoder layers from L on cached inputs of layer L
    # gives the full model's logits: refinement then skips the layers below the first steered one.
    embeds_are_stream: bool = False

    def site(self, site: str) -> SiteSpec:
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

    def hook_module(self, site: str, layer: int) -> str:
        return self.site_at(site, layer).hook.format(L=layer)

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
    ),
    "resid_pre": SiteSpec(writers=("model.embed_tokens",), hook="model.embed_tokens", embedding=True, layers=(0,)),
}

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        name="llama-family",
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        layers="model.layers",
        num_layers_key="num_hidden_layers",
        hidden_size_key="hidden_size",
        sites=_LLAMA_SITES,
        embeds_are_stream=True,
    ),
)


def check_site_name(site: str) -> str:
    """``site`` if it names a residual-stream site, else a one-line error listing them."""
    if site not in SITES:
        raise LoraCompileError(f"unknown site {site!r}: use one of {', '.join(SITES)}")
    return site


def supported_model_types() -> list[str]:
    return sorted(t for a in ARCHITECTURES for t in a.model_types)


def architecture_for(model_type: str) -> Architecture:
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    raise LoraCompileError(
        f"unsupported architecture {model_type!r}; supported model types: " + ", ".join(supported_model_types())
    )
