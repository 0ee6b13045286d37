"""A ``transformers`` causal-LM patch: per-token log-probs (and entropies) of given labels, or the
fused policy loss, from the model's forward, through ``linear_logprobs`` / ``linear_policy_loss``,
without computing the logits.

    from rlad_kernels import apply_rlad_kernels

    apply_rlad_kernels(model)                       # patches this instance's forward, not its class
    out = model(input_ids, attention_mask=mask, logprobs_of=labels, temperature=0.7, return_entropy=True)
    out.logprobs, out.entropy                       # [B, L-1] each; out.logits is None
    out = model(input_ids, attention_mask=mask, logprobs_of=labels, labels_to_keep=K,
                policy_loss=dict(advantages=A, old_logp=lp_old, teacher_logp=lp_t, config=cfg))
    out.loss.backward()                             # the TRRD / GRPO loss; A, lp_old, lp_t: [B, K]

Computing the loss inside the forward is what keeps distributed wrappers correct: DDP's gradient
hooks and FSDP's parameter gathering run around ``forward``, so ``wrapped_model(...)`` with
``policy_loss=`` behaves like any other loss-returning forward.

``labels`` follow Hugging Face's convention: aligned with ``input_ids`` (the same shape) and
shifted inside, so ``out.logprobs[:, t]`` is ``log p(labels[:, t+1] | tokens <= t)``, and
positions whose shifted label is ``-100`` give 0 (and no gradient). The hidden states come from
``model.get_decoder()`` (its final norm applied) and the head from ``model.get_output_embeddings()``
(weight and bias), so gradients reach every parameter, as the logits-based loss would. The
model's logit map is honoured: Cohere's ``config.logit_scale`` multiplies the logits, Granite's
``config.logits_scaling`` divides them, Gemma 2/3's ``config.final_logit_softcapping``
soft-caps them. Without ``logprobs_of`` the forward is the original one, untouched.

``transformers`` is imported only when a patched model runs, so ``import rlad_kernels`` stays light.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..losses import linear_policy_loss
from ..ops.common.head import LMHead
from ..ops.logprobs.api import linear_logprobs
from ..ops.policy_loss.math import TokenInputs

_STATE = "_rlad_kernels_patch"  # instance attribute holding what remove_rlad_kernels restores


def logit_map(model) -> dict:
    """How the model turns its lm_head output into logits: ``logit_scale`` (Cohere's
    ``config.logit_scale`` multiplies, Granite's ``logits_scaling`` divides) and ``softcap`` (Gemma
    2/3's ``final_logit_softcapping``), as :meth:`LMHead.of` reads them. Plain models give
    ``{"logit_scale": 1.0, "softcap": None}``."""
    head = LMHead.of(model)
    return {"logit_scale": head.logit_scale, "softcap": head.softcap}


def decoder_hidden(model, input_ids, attention_mask, position_ids, **kwargs) -> torch.Tensor:
    """Final hidden states [B, L, H] of the decoder (after its final norm), no logits."""
    decoder = model.get_decoder()
    kwargs.setdefault("use_cache", False)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
    return out.last_hidden_state


@functools.cache
def _output_class():
    from transformers.modeling_outputs import CausalLMOutputWithPast

    @dataclass
    class RladCausalLMOutput(CausalLMOutputWithPast):
        """``CausalLMOutputWithPast`` with ``logits=None`` and the per-token ``logprobs`` [B, L-1]
        (and ``entropy`` [B, L-1] when asked) of the shifted labels; with ``policy_loss=``, ``loss``
        is the fused policy loss and ``metrics`` its detached metrics."""

        logprobs: torch.Tensor | None = None
        entropy: torch.Tensor | None = None
        metrics: dict | None = None

    return RladCausalLMOutput


def _head(model):
    """(lm_head module); a ValueError naming the model class for anything that is not a causal LM
    with a separate decoder and output embeddings."""
    name = type(model).__name__
    get_head, get_decoder = getattr(model, "get_output_embeddings", None), getattr(model, "get_decoder", None)
    if get_head is None or get_decoder is None:
        raise ValueError(f"apply_rlad_kernels: {name} is not a transformers model (no get_output_embeddings / "
                         f"get_decoder)")
    head = get_head()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"apply_rlad_kernels: {name} has no output embeddings (lm_head); it needs a causal LM such "
                         f"as AutoModelForCausalLM")
    decoder = get_decoder()
    if decoder is None or decoder is model:
        raise ValueError(f"apply_rlad_kernels: {name} has no separate decoder (get_decoder()); it needs a causal LM "
                         f"such as AutoModelForCausalLM")
    return head


def apply_rlad_kernels(model, *, impl: str | None = None):
    """Patch ``model`` (this instance only) so that its forward takes ``logprobs_of=labels`` and
    then returns per-token log-probs through ``linear_logprobs`` instead of logits.

    The patched forward is ``model(input_ids, attention_mask=..., position_ids=..., logprobs_of=labels,
    temperature=1.0, return_entropy=False, labels_to_keep=None, vocab_size=None, policy_loss=None,
    **decoder_kwargs)``. With ``logprobs_of`` (``[B, L]`` like ``input_ids``, Hugging Face's unshifted
    ``labels``, ``-100`` to skip) it returns an output object with ``logprobs`` ``[B, L-1]``:
    ``log_softmax(logits[:, :-1] / temperature)`` gathered at ``labels[:, 1:]``, 0 where that label
    is ``-100``; ``entropy`` ``[B, L-1]`` when ``return_entropy``; ``logits`` None.

    * ``labels_to_keep=K``: only the last K labels are scored (the head runs on the last K
      positions, like ``logits_to_keep`` in transformers); outputs are ``[B, K]``. For a prompt
      followed by a K-token completion this skips the prompt's head work.
    * ``vocab_size=V``: normalize over the first V rows of the lm_head only (a teacher whose head is
      padded beyond the student's vocabulary, scoring the student's tokens).
    * ``policy_loss=dict(...)``: keyword arguments of :func:`rlad_kernels.linear_policy_loss`
      (``inputs=TokenInputs(...)``, ``teacher_hidden``, ``teacher_head``, ``normalizer``, ``config``,
      ...), every per-token tensor shaped like the output log-probs; the per-token inputs may also
      be given as keys of their own (``advantages``, ``old_logp``, ``teacher_logp``, ``ref_logp``,
      ``token_weights``, ``kd_weights``). The output's ``loss`` is then the policy loss, ``metrics`` its metrics, and
      ``logprobs`` / ``entropy`` the detached per-token values the loss op computed.

    Other keyword arguments go to the decoder (``use_cache`` defaults to False); ``labels`` and
    ``logits_to_keep`` are refused beside ``logprobs_of``. Without ``logprobs_of`` the original
    forward runs, unchanged.

    ``impl`` is ``linear_logprobs``'s (triton on CUDA, torch otherwise by default). Applying again
    only updates ``impl``; ``remove_rlad_kernels(model)`` restores the original forward.
    Returns ``model``.
    """
    _head(model)  # refuse non-causal-LMs now, not at the first call
    state = model.__dict__.get(_STATE)
    if state is not None:
        state["impl"] = impl
        return model
    original = model.forward
    # "own": an instance forward someone (accelerate, another patch) set before us, restored on removal
    state = {"impl": impl, "own": model.__dict__.get("forward")}

    @functools.wraps(original)
    def forward(*args, logprobs_of=None, temperature: float = 1.0, return_entropy: bool = False,
                labels_to_keep: int | None = None, vocab_size: int | None = None, policy_loss: dict | None = None,
                **kwargs):
        if logprobs_of is None:
            for name, given in (("labels_to_keep", labels_to_keep), ("vocab_size", vocab_size),
                                ("policy_loss", policy_loss)):
                if given is not None:
                    raise ValueError(f"{type(model).__name__} (rlad_kernels patch): {name}= needs logprobs_of=")
            return original(*args, **kwargs)
        return _logprobs_forward(model, state["impl"], args, kwargs, logprobs_of, temperature=temperature,
                                 return_entropy=return_entropy, labels_to_keep=labels_to_keep, vocab_size=vocab_size,
                                 policy_loss=policy_loss)

    model.__dict__[_STATE] = state
    model.forward = forward
    return model


def remove_rlad_kernels(model):
    """Undo ``apply_rlad_kernels``: the model's forward is the one it had before. A no-op on an
    unpatched model. Returns ``model``."""
    state = model.__dict__.pop(_STATE, None)
    if state is None:
        return model
    if state["own"] is not None:
        model.forward = state["own"]
    else:
        del model.forward
    return model


def _logprobs_forward(model, impl, args, kwargs, labels, *, temperature: float, return_entropy: bool,
                      labels_to_keep: int | None, vocab_size: int | None, policy_loss: dict | None):
    name = type(model).__name__
    keep = kwargs.get("logits_to_keep")
    for refused, given in (("labels", kwargs.get("labels") is not None),
                           ("logits_to_keep", keep is not None and not (isinstance(keep, int) and keep == 0))):
        if given:
            raise ValueError(f"{name} (rlad_kernels patch): {refused}= cannot be combined with logprobs_of=, which "
                             f"returns log-probs instead of logits")
    kwargs.pop("labels", None)
    kwargs.pop("logits_to_keep", None)
    kwargs.pop("return_dict", None)  # always an output object
    if len(args) > 1:
        raise ValueError(f"{name} (rlad_kernels patch): pass everything but input_ids by keyword with logprobs_of=")
    input_ids = args[0] if args else kwargs.pop("input_ids", None)
    embeds = kwargs.get("inputs_embeds")
    ref = input_ids if input_ids is not None else embeds
    shape = tuple(ref.shape[:2]) if ref is not None else None
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != shape:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"{name} (rlad_kernels patch): logprobs_of must be a tensor shaped like input_ids {shape} "
                         f"(labels aligned with input_ids, shifted inside); got {got}")
    K = labels_to_keep
    if K is not None and (isinstance(K, bool) or not isinstance(K, int) or not 1 <= K <= shape[1] - 1):
        raise ValueError(f"{name} (rlad_kernels patch): labels_to_keep must be an int in [1, {shape[1] - 1}] (the "
                         f"number of trailing labels to score), got {K!r}")
    if policy_loss is not None and not isinstance(policy_loss, dict):
        raise TypeError(f"{name} (rlad_kernels patch): policy_loss must be a dict of linear_policy_loss keyword "
                        f"arguments, got {type(policy_loss).__name__}")
    head = LMHead.of(model)  # apply_rlad_kernels checked the model (_head)
    V = vocab_size
    if V is not None:
        rows = head.weight.shape[0]
        if isinstance(V, bool) or not isinstance(V, int) or not 1 <= V <= rows:
            raise ValueError(f"{name} (rlad_kernels patch): vocab_size must be an int in [1, {rows}] (rows "
                             f"of its lm_head), got {V!r}")
        head = LMHead(head.weight[:V], head.bias[:V] if head.bias is not None else None, head.logit_scale,
                      head.softcap)
    attention_mask = kwargs.pop("attention_mask", None)
    position_ids = kwargs.pop("position_ids", None)
    hidden = decoder_hidden(model, input_ids, attention_mask, position_ids, **kwargs)[:, :-1]
    targets = labels[:, 1:].to(hidden.device)
    if K is not None:
        hidden, targets = hidden[:, -K:], targets[:, -K:]
    if policy_loss is not None:
        refused = {"hidden", "head", "weight", "targets", "bias", "temperature", "impl", "logit_scale", "softcap"}
        clash = sorted(refused & policy_loss.keys())
        if clash:
            raise ValueError(f"{name} (rlad_kernels patch): policy_loss must not set {', '.join(clash)}; the patch "
                             f"takes them from the model and the forward's own arguments")
        pl = dict(policy_loss)
        per_token = {k: pl.pop(k) for k in TokenInputs._fields if k in pl}
        if per_token and "inputs" in pl:
            raise ValueError(f"{name} (rlad_kernels patch): policy_loss has inputs= and {', '.join(per_token)}; give "
                             f"the per-token inputs one way")
        inputs = pl.pop("inputs", None) or TokenInputs(**{"advantages": None, "old_logp": None, **per_token})
        out = linear_policy_loss(hidden, head, targets, inputs, temperature=temperature, impl=impl, **pl)
        ent = out.entropy if return_entropy else None
        return _output_class()(loss=out.loss, logits=None, logprobs=out.logp, entropy=ent, metrics=out.metrics)
    out = linear_logprobs(hidden, head, targets, return_entropy=return_entropy, temperature=temperature, impl=impl)
    logp, ent = out if return_entropy else (out, None)
    return _output_class()(logits=None, logprobs=logp, entropy=ent)
