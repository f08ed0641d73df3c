"""The structured method: parameter groups, their rules, and the operands they feed.

A `StructuredPlan` splits the selected parameters between structured rules
(one per module with a registered rule) and the generic per-example-gradient
group. It is built and verified on a few examples: every rule must reproduce
autograd's gradient there, otherwise its parameters move to the generic group,
so a module used in a way its rule does not describe can cost speed but never
correctness.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch.nn.utils import parametrize

from lazykernel._chain import LayerChain, exact_by_construction
from lazykernel._jacobian import VmapFailed, forward_mode_works, ntvp_rows, per_example_jacobian
from lazykernel._memory import empty_buffer
from lazykernel._model import ModelAdapter
from lazykernel.rules import (GRADIENT, BroadcastParameterRule, EmbeddingRule, PAIRWISE, TOKENS, GradientOf,
                              RuleDoesNotApply, StructuredRule, TermShape, TokenRows, gradient_is_smaller, rule_for,
                              with_first_copy_changed)

# (a_list, g_list) for gram_hadamard_accumulate, the sparse embedding terms, and
# the per-example gradients formed block by block
Operands = Tuple[List[torch.Tensor], List[torch.Tensor], List[TokenRows], List[GradientOf]]

# Cotangent bytes of one output's backward from which a backward per output
# pays for its passes, where batching falls back (`_batched_backward_falls_back`)
_PER_OUTPUT_PASS_BYTES = 8 << 20
# Units of ``ε·‖V ⊙ grad‖`` (`_dot`) the rule check allows beside its relative tolerance.
# In float16 and bfloat16 rules that hold differed from autograd by up to 1.4 of them
# (transformer, CNN with BatchNorm and GroupNorm, LayerNorm MLPs of up to 12 layers),
# 1.5 % of the value in bfloat16, which the relative tolerance alone refused; rules that
# read another example's rows differed by 10 and more. In float32 and float64 the units
# are far below the relative tolerance.
_GRADIENT_ROUNDING_UNITS = 4
# elements of a gradient `_dot` multiplies at a time
_DOT_SLAB = 1 << 16
# held while PyTorch's vmap-fallback warnings are on (`_batched_backward_falls_back`)
_PROBE_LOCK = threading.Lock()


class StructuredPlan:
    """Which rule handles which parameters.

    Attributes:
        rules: structured rules, each owning some selected parameters.
        generic: names of the selected parameters left to the generic rule.
        forms: per rule, one form per term (pairwise positions, per-example
            gradient, sparse tokens), decided by :meth:`choose_forms`.
    """

    def __init__(self, adapter: ModelAdapter, rules: List[StructuredRule], generic: List[str]):
        self.adapter = adapter
        self.rules = rules
        self.generic = generic
        self.forms: List[Optional[List[str]]] = [None] * len(rules)
        self.outputs: Optional[int] = None
        # decided when the plan is verified (see `per_output_backward`)
        self.falls_back = False
        self.cotangent_bytes_per_example = 0.0
        # a plain nn.Sequential's own backward (`LayerChain`), once verified against autograd
        self.chain: Optional[LayerChain] = None
        # Set by `verify` where PyTorch's vmap got the batched backward or the generic
        # group's per-example Jacobians wrong on the probe examples (it does for some
        # ops' backward): those then loop over outputs, or examples and outputs.
        self.batched_is_wrong = False
        self.generic_by_loop = False
        # set by a capture that left those findings to `_verify` (see `_capture`)
        self._batched_checks_deferred = False
        # a perceptron whose rules hold by construction (`exact_by_construction`), found by `verify`
        self.exact = False

    def capture_name(self, rows: int) -> str:
        """How a capture of ``rows`` examples takes the cotangents of the outputs."""
        if self.chain is not None:
            return "one backward of the layer chain, batched over outputs"
        if self.per_output_backward(rows):
            return "one backward per output"
        return "one backward batched over outputs"

    def per_output_backward(self, rows: int) -> bool:
        """Does a capture of ``rows`` examples run one plain backward per output?

        It does where the backward batched over outputs would fall back to a
        loop anyway (`_batched_backward_falls_back`, found when the plan is
        verified) and one output's cotangents are large enough to pay for a
        pass of their own, and always for a model with a rule whose capture runs
        a recurrent layer step by step (`StructuredRule.stepwise`).
        """
        return ((self.falls_back and self._pays_per_output(rows)) or self.batched_is_wrong
                or any(rule.stepwise for rule in self.rules))

    def _pays_per_output(self, rows: int) -> bool:
        # below a few MiB per output, one batched pass beats O passes' overhead
        return rows * self.cotangent_bytes_per_example >= _PER_OUTPUT_PASS_BYTES

    def describe(self) -> List[dict]:
        rows = [
            {"rule": type(rule).__name__, "params": sorted(rule.names.values()),
             "form": "+".join(sorted(set(forms))) if forms else PAIRWISE}
            for rule, forms in zip(self.rules, self.forms)
        ]
        if self.generic:
            rows.append({"rule": "PerExampleJacobian", "params": list(self.generic),
                         "form": GRADIENT})
        return rows

    # -- building ----------------------------------------------------------------
    @classmethod
    def build(cls, adapter: ModelAdapter) -> "StructuredPlan":
        if adapter.module is None:
            taps = [BroadcastParameterRule(name, p) for name, p in adapter.params.items()]
            return cls(adapter, taps, [])
        by_identity = {id(p): name for name, p in adapter.params.items()}
        owners: Dict[int, int] = {}
        computed: set = set()
        for module in adapter.module.modules():
            for p in module.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
                if isinstance(module, parametrize.ParametrizationList) or module._forward_pre_hooks:
                    computed.add(id(p))
        rules, claimed = [], set()
        for module in adapter.module.modules():
            rule_cls = rule_for(module)
            if rule_cls is None:
                continue
            names = {}
            for local, p in rule_cls.handled(module).items():
                # A parameter owned by two modules (tied weights) needs the sum of
                # both uses before the Gram; the generic rule does that.
                if id(p) in by_identity and owners[id(p)] == 1 and by_identity[id(p)] not in claimed:
                    names[local] = by_identity[id(p)]
            if names:
                rules.append(rule_cls(module, names))
                claimed.update(names.values())
        for name, p in adapter.params.items():
            # A parameter a layer's weight is computed from (a parametrization, or a
            # pre-hook such as the old weight_norm) reaches ops written for the
            # parameter's own shape: torch._weight_norm does not check shapes and
            # corrupts memory when handed an expanded copy.
            if name not in claimed and owners.get(id(p), 0) == 1 and id(p) not in computed:
                rules.append(BroadcastParameterRule(name, p))
                claimed.add(name)
        generic = [name for name in adapter.params if name not in claimed]
        return cls(adapter, rules, generic)

    def demote(self, rule: StructuredRule) -> None:
        index = self.rules.index(rule)
        self.rules.pop(index)
        self.forms.pop(index)
        order = list(self.adapter.params)
        self.generic = sorted(set(self.generic) | set(rule.names.values()), key=order.index)

    # -- running -------------------------------------------------------------------
    def _capture(self, x: torch.Tensor, summed: bool = False, probe_rows: Optional[int] = None,
                 chunked: Sequence[StructuredRule] = (), defer_batched: bool = True
                 ) -> Tuple[torch.Tensor, List[Optional[List[torch.Tensor]]]]:
        """Forward with the rules' hooks, then cotangents at every hooked output.

        The cotangents are ``[O, *y.shape]``, one per output, or with
        ``summed=True`` the single cotangent of ``Σ_o w_o f_o``, ``[1, *y.shape]``
        (`check_weights`: fixed random weights, so that no output cancels another).
        With ``probe_rows`` (the largest batch later captures will see) it also
        finds how those take the per-output cotangents (`per_output_backward`),
        unless ``defer_batched`` and the model may be a layer chain, which takes
        them itself (`_verify` then finds it only if the chain is refused).
        Runs with autograd on even when the caller has it off; a verified
        layer chain (`LayerChain`) takes the per-output cotangents without it,
        and hands those of the rules in ``chunked`` to them chunk by chunk
        (their entry is then None).
        """
        with _differentiable(x) as x:
            if self.chain is not None and not summed:
                f, per_rule = self.chain.capture(x, self.rules, chunked=chunked)
                if self.outputs is not None and f.shape[1] != self.outputs:
                    raise RuleDoesNotApply(f"lazykernel: the model returned {f.shape[1]} outputs per example, "
                                           f"not {self.outputs}")
                return f, per_rule
            with torch.enable_grad():
                return self._capture_with_grad(x, summed, probe_rows, defer_batched)

    def _may_take_chain(self) -> bool:
        """Could `_verify` hand the per-output cotangents to a `LayerChain`?"""
        # the chain runs its layers on x itself: one input tensor only
        return (bool(self.rules) and not self._taps() and self.adapter.layout is None
                and LayerChain.of(self.adapter.module) is not None)

    def _capture_with_grad(self, x: torch.Tensor, summed: bool, probe_rows: Optional[int],
                           defer_batched: bool = True) -> Tuple[torch.Tensor, List[List[torch.Tensor]]]:
        n = x.shape[0]
        for rule in self.rules:
            rule.attach()
            rule.batch = n
        # A chunk's capture also watches for uses of the rules' parameters outside their
        # modules' calls, which the check saw on the probe examples only (a Python branch
        # that other examples take): found, they send the call to the jacobian method.
        marked = contextlib.nullcontext({}) if summed else _outside_uses_marked(self.rules)
        try:
            with marked as stand_ins:
                taps = {rule.names[""]: rule.tap(n) for rule in self.rules
                        if isinstance(rule, BroadcastParameterRule)}
                with _expanded_parameters_quietly():
                    y = self.adapter.forward_with(taps, x)
        finally:
            for rule in self.rules:
                rule.detach()
        outside = _used_outside(stand_ins, y)
        if outside:
            raise RuleDoesNotApply(f"lazykernel: the parameters of a {type(outside[0].module).__name__} "
                                   f"({', '.join(sorted(outside[0].names.values()))}) were used outside its call")
        f = y.reshape(n, -1)
        if self.outputs is not None and f.shape[1] != self.outputs:
            raise RuleDoesNotApply(f"lazykernel: with expanded parameters the model returned "
                                   f"{tuple(y.shape)}, not {self.outputs} outputs per example")
        targets = [out for rule in self.rules for out in rule.outputs]
        if not targets:
            cotangents = []
        elif summed:
            deferred = False
            if probe_rows is not None:
                self.cotangent_bytes_per_example = sum(t.numel() * t.element_size() for t in targets) / n
                # with a layer chain, autograd's batched backward is never taken
                deferred = self._batched_checks_deferred = (defer_batched and f.shape[1] > 1
                                                            and self._may_take_chain())
                self.falls_back = (not deferred and self._pays_per_output(max(probe_rows, n))
                                   and _batched_backward_falls_back(f, targets))
            weights = check_weights(f.shape[1], f)
            checks_batched = probe_rows is not None and f.shape[1] > 1 and not deferred
            cotangents = _output_cotangents(f @ weights, targets, retain_graph=checks_batched)
            if checks_batched:
                # the batched backward the chunks will take, against the plain one
                batched = _output_cotangents(f, targets)
                # (a layer's cotangents are in its own dtype, which may not be the outputs')
                self.batched_is_wrong = not all(
                    _close(torch.tensordot(weights.squeeze(1).to(b.dtype), b, dims=1), c[0],
                           _tolerance(b.dtype))
                    for b, c in zip(batched, cotangents))
        else:
            layouts = [rule.examples_first for rule in self.rules for _ in rule.outputs]
            cotangents = _output_cotangents(f, targets, self.per_output_backward(n), layouts)
        per_rule, k = [], 0
        for rule in self.rules:
            count = len(rule.outputs)
            per_rule.append(cotangents[k:k + count])
            k += count
        return f.detach(), per_rule

    def verify(self, x: torch.Tensor, rows: Optional[int] = None) -> torch.Tensor:
        """Check every rule against autograd on ``x``; demote the ones that disagree.

        The check is per rule and per example: each example's gradient
        ``Σ_o w_o ∂f_o(x_i)/∂θ`` of the rule's parameters implied by its operands
        must match autograd's (along a random direction, see
        `_agrees_along_random_direction`; w: `check_weights`). A
        rule that misreads which rows belong to which example (a layer applied to a
        sequence-first or folded batch) or that misses uses of its parameters
        outside the hooked call fails it and is replaced by the generic rule. A use
        outside the call is also found where it has no derivative on ``x``, from the
        autograd graph (`_demote_rules_used_outside_their_calls`).

        ``rows`` is the largest batch the plan will capture (default: ``x``'s).

        Returns the model's outputs on ``x`` as ``[n, O]``.
        """
        with _differentiable(x) as x:
            return self._verify(x, rows)

    def _verify(self, x: torch.Tensor, rows: Optional[int]) -> torch.Tensor:
        if x.shape[0] == 1:
            # with one example, a batch axis mixed up with another axis cannot show
            x = torch.cat([x, x])
        n = x.shape[0]
        rows = n if rows is None else rows
        self._drop_failing_taps(x)
        # a perceptron's Linear rules hold by construction: only their shapes are needed
        exact = self.exact = exact_by_construction(self.adapter.module, x)
        if not exact:
            self._demote_rules_used_outside_their_calls(x)
        # the check needs only Σ_o of each example's gradient: one plain backward
        try:
            f, per_rule = self._capture(x, summed=True, probe_rows=rows)
            shared = self._shared_lookups()
            if shared and not self._lookups_are_own(shared, x, f):
                raise RuleDoesNotApply("a lookup expanded along the batch changes the model's outputs")
        except Exception:
            expanded = self._taps() + self._shared_lookups()
            if not expanded:
                raise
            # expanded parameters (or lookups) that work one by one but not together: none of them
            for rule in expanded:
                self.demote(rule)
            f, per_rule = self._capture(x, summed=True, probe_rows=rows)
        self.outputs = f.shape[1]
        if not self.rules:
            self._check_generic_jacobians(x)
            return f
        rules = list(self.rules)
        tol = _tolerance(f.dtype)
        operands: Dict[StructuredRule, Optional[list]] = {}
        # what each rule read in the plain forward, for the layer chain's check below
        seen = {rule: list(rule.inputs) for rule in rules}
        for rule, cotangents in zip(rules, per_rule):
            try:
                if not cotangents or any(a.shape[0] == 0 for a in rule.inputs):
                    # not called on these examples (or on none of them), so not
                    # checked: routing by example could call it on others
                    raise RuleDoesNotApply("no call on the verification examples")
                rule.find_batch_axes(n)
                rule.shapes = rule.term_shapes()
                operands[rule] = [] if exact else rule.operands(cotangents, n, None)
            except torch.OutOfMemoryError:
                raise
            except (RuleDoesNotApply, IndexError, RuntimeError):
                operands[rule] = None
            rule.clear()
        checked = [rule for rule in rules if operands[rule] is not None]
        if checked and not exact:
            checked = _agrees_along_random_direction(self.adapter, checked, operands, x, tol)
        for rule in rules:
            if rule not in checked:
                self.demote(rule)
        # the generic group as the check left it, demoted rules' parameters included
        self._check_generic_jacobians(x)
        # A plain layer chain takes the per-output cotangents itself, stored with
        # the examples outermost. PyTorch's batched backward would loop over the
        # outputs for a convolution; for a Linear at one position it is batched,
        # but its [O, n, D] result must then be copied into the op's [n, O, D]
        # (about a tenth of a width-1024 MLP's call), which the chain's layout
        # is already.
        if self.outputs > 1 and self.rules and not self._taps() and self.adapter.layout is None:
            chain = LayerChain.of(self.adapter.module)
            if chain is not None and _chain_agrees(chain, self.rules, dict(zip(rules, per_rule)), seen, x, f, tol):
                self.chain = chain
        if self.chain is None and self._batched_checks_deferred:
            # the chain was refused: the captures take autograd's batched backward after all
            self._capture(x, summed=True, probe_rows=rows, defer_batched=False)
            for rule in self.rules:
                rule.clear()
        return f

    def _drop_failing_taps(self, x: torch.Tensor) -> None:
        """Demote broadcast-parameter rules whose expanded parameter the forward cannot take,
        or that changes what the forward computes."""
        if self._taps():
            with torch.no_grad():
                plain = [self.adapter.forward(x[:rows]).reshape(rows, -1) for rows in _tap_batch_sizes(x)]
            self.outputs = plain[0].shape[1]
            self._demote_taps_failing_on(x, search_lead=True, plain=plain)

    def check_taps_at(self, probe: torch.Tensor, rows: int) -> None:
        """Demote broadcast-parameter rules and shared lookups that a batch of ``rows`` examples breaks.

        A forward that slices a parameter (``pos[:T]``) slices the expanded
        copy's batch axis instead: harmless while the batch is no longer than
        the slice, an error once it is. The probe examples, repeated to the
        largest chunk, show it before any chunk is computed.
        """
        if rows <= probe.shape[0] or not (self._taps() or self._shared_lookups()):
            return
        generic = list(self.generic)
        x = probe[torch.arange(rows, device=probe.device) % probe.shape[0]]
        if self._taps():
            self._demote_taps_failing_on(x, search_lead=False)
        shared = self._shared_lookups()
        if shared:
            # a lookup sliced after it (``pos(arange(L))[:T]``) likewise
            try:
                with torch.no_grad():
                    plain = self.adapter.forward(x).reshape(rows, -1)
                works = _close(self._forward_with_lookups(shared, x, "expand"), plain, _tolerance(plain.dtype))
            except Exception:
                works = False
            if not works:
                for rule in shared:
                    self.demote(rule)
        if self.generic != generic:
            self._check_generic_jacobians(probe)

    def _check_generic_jacobians(self, x: torch.Tensor) -> None:
        """How are the generic group's per-example Jacobians formed (`jacobian_loop`)? Asked
        again whenever parameters join the group, since their ops may be the ones vmap gets
        wrong, until it comes to one backward per example and output."""
        if self.generic and self.generic_by_loop is not True:
            self.generic_by_loop = jacobian_loop(self.adapter, self.generic, x)

    def _demote_rules_used_outside_their_calls(self, x: torch.Tensor) -> None:
        """Demote the module rules whose parameters the forward on ``x`` also uses outside the module's call.

        A rule describes its module's call; a use elsewhere (``F.linear(x, layer.weight)``,
        a row of an embedding read directly) adds a gradient the rule leaves out. Where
        that use has no derivative on these examples (``torch.where`` takes it for other
        inputs only) no comparison of values can show it, so it is found in the graph:
        outside the module's call its parameters are stand-ins with the same values,
        and a rule whose stand-ins the output's autograd graph reaches is demoted.
        """
        try:
            with _outside_uses_marked(self.rules) as stand_ins, torch.enable_grad(), \
                    _expanded_parameters_quietly():
                outside = _used_outside(stand_ins, self.adapter.forward(x)) if stand_ins else []
        except Exception:
            # a forward that fails here fails the capture that follows, which says why
            return
        for rule in outside:
            self.demote(rule)

    def _shared_lookups(self) -> List[EmbeddingRule]:
        """Embedding rules whose ids have no batch axis, their lookups expanded along it."""
        return [rule for rule in self.rules if isinstance(rule, EmbeddingRule) and rule.shared]

    def _lookups_are_own(self, shared: List[EmbeddingRule], x: torch.Tensor, f: torch.Tensor) -> bool:
        """Are ``f``, the outputs of a capture with ``shared`` lookups expanded along the
        batch, the model's own outputs on ``x``, and does each example read only its own
        copy? A forward that reshapes or reduces the lookup changes the outputs; one that
        broadcasts it against another axis of size n may not, but then changing example
        0's copy changes the others' outputs (as for `_copies_are_own`)."""
        with torch.no_grad():
            plain = self.adapter.forward(x)
        tol = _tolerance(f.dtype)
        if plain.numel() != f.numel() or not _close(f, plain.reshape(f.shape).to(f.dtype), tol):
            return False
        y = self._forward_with_lookups(shared, x, "perturb")
        return _close(y[1:], f[1:].to(y.dtype), tol)

    def _forward_with_lookups(self, shared: List[EmbeddingRule], x: torch.Tensor, trial: str) -> torch.Tensor:
        """The model's outputs ``[n, O]`` on ``x`` with the ``shared`` lookups expanded along the
        batch (``trial``: "expand", or "perturb" to change example 0's copy), recording nothing."""
        n = x.shape[0]
        recorded = {rule: (rule.inputs, rule.outputs) for rule in shared}  # a capture's, kept
        for rule in shared:
            rule.attach()
            rule.batch, rule.trial = n, trial
        try:
            with torch.no_grad():
                return self.adapter.forward(x).reshape(n, -1)
        finally:
            for rule in shared:
                rule.detach()
                rule.trial = None
                rule.inputs, rule.outputs = recorded[rule]

    def _taps(self) -> List[BroadcastParameterRule]:
        return [rule for rule in self.rules if isinstance(rule, BroadcastParameterRule)]

    def _demote_taps_failing_on(self, x: torch.Tensor, search_lead: bool,
                                plain: Optional[List[torch.Tensor]] = None) -> None:
        """All taps together decide the common case; only a failure tries them one by one,
        each (with ``search_lead``) at every number of singleton axes after the batch axis.
        ``plain``: the model's own outputs for `_tap_batch_sizes`, if the values are to be compared."""
        taps = self._taps()
        if self._forward_accepts(taps, x, plain):
            return
        for rule in taps:
            leads = rule.leads() if search_lead else (rule.lead,)
            for lead in leads:
                rule.lead = lead
                if self._forward_accepts([rule], x, plain):
                    break
            else:
                self.demote(rule)

    def _forward_accepts(self, taps: List[StructuredRule], x: torch.Tensor,
                         plain: Optional[List[torch.Tensor]] = None) -> bool:
        """Does the forward take the expanded parameters, at ``x``'s batch size and one less?

        An expanded ``[n, ...]`` parameter also broadcasts against another axis of
        size n, which the two sizes cannot both match. With ``plain`` (the
        model's own outputs at those sizes) the outputs must also be the same:
        a forward that reduces or reorders a parameter along its first axis
        (``softmax(p, 0)``, ``p / p.norm()``, ``p.flip(0)``) does so along the
        batch axis of the expanded copy and computes something else, whose
        cotangents would fail every other rule's check too.
        """
        for index, rows in enumerate(_tap_batch_sizes(x)):
            try:
                with torch.no_grad(), _expanded_parameters_quietly():
                    y = self.adapter.forward_with({rule.names[""]: rule.tap(rows) for rule in taps}, x[:rows])
                y = y.reshape(rows, -1)
                if y.shape[1] != self.outputs:
                    return False
                if plain is not None and not _close(y, plain[index], _tolerance(y.dtype)):
                    return False
                if plain is not None and index == 0 and rows > 1 and not self._copies_are_own(taps, x[:rows],
                                                                                            plain[0]):
                    return False
            except Exception:
                return False
            finally:
                for rule in taps:
                    rule.clear()
        return True

    def _copies_are_own(self, taps: List[StructuredRule], x: torch.Tensor, plain: torch.Tensor) -> bool:
        """Does each example read only its own copy of the expanded parameters?

        Equal outputs do not show it: a ``[1, D]`` parameter expanded to ``[n, D]``
        and added to ``[n, 1, D]`` activations broadcasts to ``[n, n, D]``, and a mean
        over that axis gives every example the same values from all the copies, while
        each copy's cotangent then mixes the examples. Changing copy 0 alone must
        leave the other examples' outputs as they were.
        """
        changed = {rule.names[""]: with_first_copy_changed(rule.tap(x.shape[0])) for rule in taps}
        with torch.no_grad(), _expanded_parameters_quietly():
            y = self.adapter.forward_with(changed, x).reshape(x.shape[0], -1)
        return _close(y[1:], plain[1:], _tolerance(y.dtype))

    def choose_forms(self, n1: int, n2: int, output: str, budget_elements: float) -> None:
        """Per term, the form with the fewest FLOPs (`term_cost`) among those that fit.

        A form whose operands for a single example would not fit comfortably in
        the memory budget (an eighth of it) is not considered unless it is the
        only one, so a huge per-example gradient is never formed to save FLOPs.
        """
        o = self.outputs or 1
        for index, rule in enumerate(self.rules):
            forms = []
            for shape in rule.shapes:
                costs = {form: term_cost(shape, form, o, output) for form in shape.forms}
                fitting = [f for f in shape.forms if costs[f][2] * 8 < budget_elements] or list(shape.forms)
                forms.append(min(fitting, key=lambda f: _block_flops(costs[f], n1, n2)))
            self.forms[index] = forms

    def rule_costs(self, output: str) -> List[Tuple[float, float, float]]:
        """Per rule, `term_cost` summed over its terms in their chosen forms."""
        o = self.outputs or 1
        totals = []
        for rule, forms in zip(self.rules, self.forms):
            total = (0.0, 0.0, 0.0)
            for shape, form in zip(rule.shapes, forms or [s.forms[0] for s in rule.shapes]):
                total = tuple(a + b for a, b in zip(total, term_cost(shape, form, o, output)))
            totals.append(total)
        return totals

    def generic_size(self) -> int:
        """Parameters in the generic (per-example Jacobian) group."""
        return sum(self.adapter.params[name].numel() for name in self.generic)

    def elements_per_example(self) -> int:
        """Elements of the operands one example produces (all groups)."""
        o = self.outputs or 1
        total = sum(cost[2] for cost in self.rule_costs("trace"))
        return int(total) + (1 + o * self.generic_size() if self.generic else 0)

    def operands(self, x: torch.Tensor) -> Operands:
        """Terms of every group for the examples ``x``: op operands and sparse token rows."""
        n = x.shape[0]
        a_list, g_list, tokens, deferred = [], [], [], []
        if self.rules:
            chunked = []
            if self.chain is not None:
                chunked = [rule for rule, forms in zip(self.rules, self.forms) if rule.takes_chunks(forms)]
                for rule in chunked:
                    rule.start_chunks(n, self.outputs)
            _, per_rule = self._capture(x, chunked=chunked)
            for rule, forms, cotangents in zip(self.rules, self.forms, per_rule):
                if cotangents is None:
                    terms = rule.chunk_terms()
                elif not cotangents:
                    continue
                else:
                    terms = rule.operands(cotangents, n, forms)
                for term in terms:
                    if isinstance(term, TokenRows):
                        tokens.append(term)
                    elif isinstance(term, GradientOf):
                        deferred.append(term)
                    else:
                        a_list.append(term.a)
                        g_list.append(term.g)
                rule.clear()
        if self.generic:
            jac = per_example_jacobian(self.adapter, self.generic, x, by_loop=self.generic_by_loop)
            a_list.append(jac.new_ones(n, 1, 1))
            g_list.append(jac.unsqueeze(1))
        return a_list, g_list, tokens, deferred


def term_cost(shape: TermShape, form: str, outputs: int, output: str) -> Tuple[float, float, float]:
    """Cost of one term in one form: (FLOPs per example pair, FLOPs per example, elements per example).

    The FLOPs of an ``N1 × N2`` block are ``N1·N2·pair + (N1+N2)·example``.
    With ``m = O²`` for full output and ``O`` otherwise (one multiply-add = 2 FLOPs):

    * pairwise, T positions: ``2·T²·(K + m·D)`` per pair: the Grams of ``a``
      and of ``g`` over all position pairs;
    * gradient: ``2·T·O·D·K`` per example to form its ``[O, D·K]`` gradient,
      plus ``2·m·D·K`` per pair for their Gram;
    * tokens (embedding, sparse): ``2·matches·m·D`` per pair, one dot product per
      token row the two examples share.
    """
    m = outputs * outputs if output == "full" else outputs
    t, k, d = shape.positions, shape.k, shape.d
    if form == PAIRWISE:
        return 2.0 * t * t * (k + m * d), 0.0, float(t * (k + outputs * d))
    if form == TOKENS:
        return 2.0 * shape.matches * m * d, 0.0, float(t * (outputs * d + 2))
    if shape.kind == "tokens":
        # a dense [vocab, dim] gradient per example, filled from its token rows
        return 2.0 * m * k * d, 2.0 * t * outputs * d, float(1 + outputs * k * d)
    # formed block by block from its operands when those are the smaller (`GradientOf`)
    held = 1 + outputs * d * k if not is_deferred(shape, form, outputs) else t * (k + outputs * d)
    return 2.0 * m * d * k, 2.0 * t * outputs * d * k, float(held)


def _tap_batch_sizes(x: torch.Tensor) -> Tuple[int, ...]:
    """The batch sizes at which `StructuredPlan._forward_accepts` runs the forward: ``x``'s and one less."""
    return (x.shape[0], x.shape[0] - 1) if x.shape[0] > 2 else (x.shape[0],)


def is_deferred(shape: TermShape, form: str, outputs: int) -> bool:
    """Is this term's per-example gradient formed block by block (`GradientOf`)?

    It is when the gradient is larger than the operands it comes from
    (`rules.gradient_is_smaller`, which `rules._linear_term` asks too).
    """
    return (form == GRADIENT and shape.kind == "linear"
            and not gradient_is_smaller(shape.positions, shape.k, shape.d, outputs))


def _block_flops(cost: Tuple[float, float, float], n1: int, n2: int) -> float:
    return float(n1) * float(n2) * cost[0] + float(n1 + n2) * cost[1]


def _output_cotangents(f: torch.Tensor, targets: List[torch.Tensor], per_output: bool = False,
                       examples_first: Optional[Sequence[bool]] = None, retain_graph: bool = False
                       ) -> List[torch.Tensor]:
    """``∂f_o/∂target`` for every output o, stacked: ``[O, *target.shape]`` each.

    One backward pass batched over the O one-hot output cotangents, unless
    ``per_output`` asks for one pass per output (also the fallback for models
    whose backward cannot be batched). Per output, a target flagged in
    ``examples_first`` is stored ``[n, O, ...]`` and returned as its transposed
    view; the values are the same either way.
    """
    n, o = f.shape
    live = [i for i, t in enumerate(targets) if t.requires_grad] if f.requires_grad else []
    if len(live) < len(targets):
        # A layer run under torch.no_grad (or outputs detached from it) has no derivative
        # to give: its cotangents are zero, as autograd's gradients of its parameters are.
        layouts = list(examples_first) if examples_first is not None else [False] * len(targets)
        found = iter(_output_cotangents(f, [targets[i] for i in live], per_output, [layouts[i] for i in live],
                                        retain_graph) if live else [])
        return [next(found) if i in live else
                (t.new_zeros((t.shape[0], o) + tuple(t.shape[1:])).transpose(0, 1) if layouts[i]
                 else t.new_zeros((o,) + tuple(t.shape)))
                for i, t in enumerate(targets)]
    if o == 1:
        grads = torch.autograd.grad(f, targets, grad_outputs=torch.ones_like(f),
                                    allow_unused=True, retain_graph=retain_graph)
        return [(_zeros_if_none(g, t)).unsqueeze(0) for g, t in zip(grads, targets)]
    basis = torch.eye(o, dtype=f.dtype, device=f.device).unsqueeze(1).expand(o, n, o)
    if not per_output:
        try:
            grads = torch.autograd.grad(f, targets, grad_outputs=basis, is_grads_batched=True,
                                        allow_unused=True, retain_graph=True)
            return [_zeros_if_none(g, t, batch=o) for g, t in zip(grads, targets)]
        except RuntimeError:
            pass
    layouts = list(examples_first) if examples_first is not None else [False] * len(targets)
    # each pass writes its cotangents straight into their place: no stack afterwards
    stores = [empty_buffer((t.shape[0], o) + tuple(t.shape[1:]) if first else (o,) + tuple(t.shape),
                           t.dtype, t.device)
              for t, first in zip(targets, layouts)]
    for k in range(o):
        grads = torch.autograd.grad(f, targets, grad_outputs=basis[k], allow_unused=True,
                                    retain_graph=k + 1 < o)
        for store, g, first in zip(stores, grads, layouts):
            row = store[:, k] if first else store[k]
            if g is None:
                row.zero_()
            else:
                row.copy_(g)
    return [store.transpose(0, 1) if first else store for store, first in zip(stores, layouts)]


def _batched_backward_falls_back(f: torch.Tensor, targets: List[torch.Tensor]) -> bool:
    """Would a backward batched over outputs run some op of this model one output at a time?

    `torch.autograd.grad(..., is_grads_batched=True)` runs on PyTorch's legacy
    vmap, which has no batching rule for some backward ops (convolution,
    pooling, layer norm, attention and embedding backward among them). For
    those it loops over the outputs and stacks the results, and then one plain
    backward per output, each writing into its final layout, is the faster
    capture. Two outputs on the verification examples show it: PyTorch names
    every such op in a warning while its vmap-fallback warnings are on.
    """
    toggle = getattr(torch._C, "_debug_only_display_vmap_fallback_warnings", None)
    enabled = getattr(torch._C, "_debug_only_are_vmap_fallback_warnings_enabled", None)
    if f.shape[1] < 2 or toggle is None or enabled is None:
        return False
    n, o = f.shape
    basis = torch.eye(2, o, dtype=f.dtype, device=f.device).unsqueeze(1).expand(2, n, o)
    # The warning switch and Python's warning filters are process-wide: probes
    # of two threads take turns, so neither restores the other's state early.
    # (Warnings other threads raise meanwhile are recorded here, not shown;
    # the probe runs once per call, on the verification examples only.)
    with _PROBE_LOCK:
        was_on = enabled()
        toggle(True)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.autograd.grad(f, targets, grad_outputs=basis, is_grads_batched=True,
                                    allow_unused=True, retain_graph=True)
        except RuntimeError:
            return True
        finally:
            toggle(was_on)
    return any("batching rule" in str(w.message) for w in caught)


@contextlib.contextmanager
def _differentiable(x: torch.Tensor) -> Iterator[torch.Tensor]:
    """Inference mode off for the block, and ``x`` as a tensor autograd can save.

    Every capture and check differentiates the model, also when the caller runs
    under ``torch.inference_mode()`` or passes tensors made there (copied here).
    """
    with torch.inference_mode(False):
        yield x.clone() if x.is_inference() else x


def _tolerance(dtype: torch.dtype) -> float:
    """Relative error the checks allow: round-off of the dtype, with room to spare."""
    return 1e-4 if dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9


def _close(got: torch.Tensor, want: torch.Tensor, tol: float) -> bool:
    """Is ``got`` within ``10·tol`` of ``want``, relative to the larger of their norms?

    Both are divided by their largest magnitude and compared in float64: the norms
    of the values themselves overflow (float32 beyond about 1e19, float16 from a few
    hundred) or underflow to zero (float32 below about 1e-22), and either passed any
    two tensors. Values that are not finite are never close.
    """
    largest = 0.0
    for t in (got, want):
        if t.numel():
            peak = float(torch.linalg.vector_norm(t.detach(), ord=math.inf))
            if not math.isfinite(peak):
                return False
            largest = max(largest, peak)
    if largest == 0.0:
        return True
    got, want = got.detach().double() / largest, want.detach().double() / largest
    scale = max(float(torch.linalg.vector_norm(want)), float(torch.linalg.vector_norm(got)))
    return float(torch.linalg.vector_norm(got - want)) <= tol * scale * 10


def jacobians_agree(adapter: ModelAdapter, names: List[str], x: torch.Tensor) -> bool:
    """Do the per-example Jacobians of ``names`` (torch.func's vmap) match autograd on ``x``?

    Along a random direction V of those parameters, ``Σ_o w_o J_o(x_i) V`` from
    the Jacobians is compared with autograd's gradient of ``Σ_o w_o f_o(x_i)``
    along V, one backward per example: reverse mode, as the Jacobians, so that
    what forward mode alone sees (the lookups of an Embedding's padding row, uses
    under ``torch.no_grad``) does not send every tied embedding to the loop. Where
    they differ, PyTorch's batched backward is wrong for some op of the model, and
    the Jacobians must come from a loop (`jacobian_loop`, which also tells a vmap that
    raises on ``x`` from one that is wrong there; both disagree here).
    """
    return jacobian_loop(adapter, names, x) is False


def jacobian_loop(adapter: ModelAdapter, names: List[str], x: torch.Tensor) -> Union[bool, str]:
    """`per_example_jacobian`'s ``by_loop`` for this model, checked on ``x`` (`jacobians_agree`).

    ``False`` where torch.func's vmap over the examples gives autograd's Jacobians;
    ``"examples"`` where that vmap raises on ``x`` and a loop of ``jacrev`` over the
    examples gives them: a batching rule that raises on some batch sizes can run,
    and be wrong, on others (PReLU's backward with one shared slope broadcast the
    examples against the features when the two counts were equal, 5 % off), so
    the vmap that was not checked is not used; ``True`` where neither matches, for
    one plain backward per example and output.
    """
    with _differentiable(x) as x:
        try:
            jac, loop = per_example_jacobian(adapter, names, x, strict=True), False
        except VmapFailed:
            jac, loop = per_example_jacobian(adapter, names, x, by_loop="examples"), "examples"
        return loop if _jacobian_agrees(adapter, names, x, jac) else True


def _jacobian_agrees(adapter: ModelAdapter, names: List[str], x: torch.Tensor, jac: torch.Tensor) -> bool:
    """Does ``jac: [n, O, P]``, per-example Jacobians of ``names`` on ``x``, match autograd along a random direction?"""
    gen = torch.Generator(device="cpu").manual_seed(2)
    values = adapter.detached_params()
    direction = {name: _rank_one_direction(values[name], gen) for name in names}
    wide = jac.detach() if jac.dtype in (torch.float32, torch.float64) else jac.detach().float()
    flat = torch.cat([direction[name].reshape(-1) for name in names]).to(wide.dtype)
    predicted = ((wide @ flat) @ check_weights(jac.shape[1], wide).squeeze(1)).double().cpu()
    tol = _tolerance(jac.dtype)
    # the Jacobians are not held through autograd's passes
    del jac, wide, flat
    actual, rounding = _gradients_along(adapter, names, direction, x)
    return _within_round_off(predicted, sum(actual.values()), sum(rounding.values()), tol)


def ntvp_agrees(adapter: ModelAdapter, x: torch.Tensor) -> bool:
    """Do the ``ntvp`` method's products (torch.func's vmap) match autograd on ``x``?

    For two random seeds w over the ``n·O`` outputs of ``x``, batched as the
    method batches its rows, and random weights u over them, ``uᵀ J (Jᵀ w)``
    from the batched products is compared with ``(Jᵀ w)·(Jᵀ u)`` from plain
    backward passes. A wrong product shows unless it is orthogonal to random
    weights (probability zero). Two seeds keep the check's memory at two
    parameter-sized tangents, whatever the number of outputs.

    A model with an op that has no forward-mode AD takes its products from
    per-example Jacobians (`ntvp_rows`); those are checked as the ``jacobian``
    method's are (`jacobians_agree`), since an error in them can hide within
    the products' round-off bound in float32 (``torch.cdist``'s is ~1e-3 of it).
    """
    with _differentiable(x) as x:
        values = adapter.detached_params()
        if not forward_mode_works(adapter, values, x):
            return jacobian_loop(adapter, list(values), x) is False
        y, vjp_fn = torch.func.vjp(lambda p: adapter.call(p, x).reshape(-1), values)
        gen = torch.Generator(device="cpu").manual_seed(3)
        seeds, u = (torch.rand(size, y.numel(), generator=gen, dtype=torch.float64).add_(0.5).to(y)
                    for size in (2, 1))
        try:
            rows = ntvp_rows(adapter, values, vjp_fn, x, seeds, by_loop=False, strict=True).detach().double()
        except VmapFailed:
            # a vmap that raised on these seeds may run, and be wrong, on the method's rows;
            # the loop, which the method then takes, raises what is wrong with the model itself
            ntvp_rows(adapter, values, vjp_fn, x, seeds, by_loop=True)
            return False

        def flat(weights: torch.Tensor) -> torch.Tensor:
            (tangent,) = vjp_fn(weights)
            return torch.cat([t.detach().reshape(-1) for t in tangent.values()]).double()

        right = flat(u[0])
        for seed, row in zip(seeds, rows):
            left = flat(seed)
            predicted, actual = float(row @ u[0].double()), float(left @ right)
            scale = max(float(left.norm() * right.norm()), 1e-30)
            if not abs(predicted - actual) <= _tolerance(y.dtype) * scale * 10:
                return False
        return True


def _agrees_along_random_direction(adapter: ModelAdapter, rules: List[StructuredRule],
                                   operands: Dict[StructuredRule, tuple],
                                   x: torch.Tensor, tol: float) -> List[StructuredRule]:
    """The rules among ``rules`` whose per-example gradients match autograd's along a random direction V.

    For every example i, ``Σ_o w_o ∂f_o(x_i)/∂θ · V`` over each rule's parameters
    (w: `check_weights`) from autograd, one backward pass per example, is compared
    with what the rule's operands predict, rule by rule: a wrong rule is not hidden
    in a sum with larger right ones (the layer of one output among thousands that
    move together), and one that gives an example's gradient to another shows. V is
    a random rank-one tensor per parameter: ``uᵀ E v`` vanishes for a nonzero error
    E with probability zero, and V costs a few random numbers, not P. Reverse mode
    is the kernel's own convention (no gradient to an Embedding's padding row, none
    through ``torch.no_grad``), so V covers every parameter.
    """
    n = x.shape[0]
    full = [rule.names[local] for rule in rules for local in rule.names]
    gen = torch.Generator(device="cpu").manual_seed(0)
    values = adapter.detached_params()
    direction = {name: _rank_one_direction(values[name], gen) for name in full}
    actual, rounding = _gradients_along(adapter, full, direction, x)
    agreeing = []
    for rule in rules:
        names = list(rule.names.values())
        want = sum(actual[name] for name in names)
        try:
            predicted = (rule.directional(operands[rule], n, direction).double().cpu()
                         if operands[rule] else torch.zeros_like(want))
        except torch.OutOfMemoryError:
            raise
        except (RuleDoesNotApply, IndexError, RuntimeError):
            # operands of the wrong sizes (a call the rule misread): it fails the check
            continue
        if predicted.shape != want.shape:
            continue
        if _within_round_off(predicted, want, sum(rounding[name] for name in names), tol):
            agreeing.append(rule)
    return agreeing


def _within_round_off(predicted: torch.Tensor, want: torch.Tensor, rounding: torch.Tensor, tol: float) -> bool:
    """Is ``predicted`` ``[n]`` within round-off of autograd's ``want`` ``[n]``: ``10·tol`` of the
    larger norm, and `_GRADIENT_ROUNDING_UNITS` of ``rounding`` (`_dot`) beside it? Autograd's
    gradients, rounded to their dtype, move each example's value by about ``ε·‖V ⊙ grad‖``:
    in half precision by more than the relative tolerance allows."""
    scale = max(float(torch.linalg.vector_norm(want)), float(torch.linalg.vector_norm(predicted)))
    allowed = tol * scale * 10 + _GRADIENT_ROUNDING_UNITS * float(torch.linalg.vector_norm(rounding))
    return float(torch.linalg.vector_norm(predicted - want)) <= allowed


def _gradients_along(adapter: ModelAdapter, names: List[str], direction: Dict[str, torch.Tensor],
                     x: torch.Tensor) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Per parameter θ of ``names``, ``[n]`` float64 on the CPU: ``Σ_o w_o ∂f_o(x_i)/∂θ · V``
    for each example i (V = ``direction``), from one backward pass per example; and
    ``ε·‖V ⊙ ∂(…)/∂θ‖`` (`_dot`)."""
    n = x.shape[0]
    actual = {name: torch.zeros(n, dtype=torch.float64) for name in names}
    rounding = {name: torch.zeros(n, dtype=torch.float64) for name in names}

    def weighted_outputs() -> Tuple[torch.Tensor, List[torch.Tensor]]:
        if adapter.module is not None and all(adapter.params[name].requires_grad for name in names):
            # the module's own parameters: no copies of them
            params = [adapter.params[name] for name in names]
            out = adapter.forward(x)
        else:
            values, params = adapter.with_leaves(names)
            out = adapter.call(values, x)
        out = out.reshape(n, -1)
        return out @ check_weights(out.shape[1], out).squeeze(1), params

    with torch.enable_grad():
        y, params = weighted_outputs()
        if not y.requires_grad:
            return actual, rounding
        once = False
        for i in range(n):
            if once:
                y, params = weighted_outputs()
            try:
                grads = torch.autograd.grad(y[i], params, allow_unused=True, retain_graph=not once and i + 1 < n)
            except RuntimeError:
                if once:
                    raise
                # a compiled model's backward that donates its buffers runs once per forward
                once = True
                y, params = weighted_outputs()
                grads = torch.autograd.grad(y[i], params, allow_unused=True)
            for name, g in zip(names, grads):
                if g is not None:
                    actual[name][i], rounding[name][i] = _dot(g, direction[name])
    return actual, rounding


def _dot(a: torch.Tensor, b: torch.Tensor) -> Tuple[float, float]:
    """``Σ a ⊙ b``, and ``ε·‖a ⊙ b‖`` with ε the unit round-off of ``a``'s dtype: about how far
    rounding ``a`` to it moves the sum. The products (in at least float32) are formed and
    summed a slab at a time, the slabs' sums added in float64: the check holds no
    parameter-sized copies."""
    a, b = a.reshape(-1), b.reshape(-1)
    wide = a.dtype if a.dtype in (torch.float32, torch.float64) else torch.float32
    # (on the device, read once: no synchronisation per slab)
    total, squares = (torch.zeros((), dtype=torch.float64, device=a.device) for _ in range(2))
    for start in range(0, a.numel(), _DOT_SLAB):
        products = a[start:start + _DOT_SLAB].to(wide) * b[start:start + _DOT_SLAB].to(wide)
        total += products.sum()
        squares += torch.dot(products, products)
    return float(total), torch.finfo(a.dtype).eps * math.sqrt(float(squares))


def _chain_agrees(chain: LayerChain, rules: List[StructuredRule],
                  reference: Dict[StructuredRule, List[torch.Tensor]],
                  inputs: Dict[StructuredRule, List[torch.Tensor]], x: torch.Tensor, f: torch.Tensor,
                  tol: float) -> bool:
    """Does the layer chain reproduce, at every rule, what the model's own forward fed it
    (``inputs``) and autograd's cotangents of ``Σ_o w_o f_o`` (``reference``)?

    ``f: [n, O]`` are the model's outputs on ``x``. The chain's forward computes the
    rules' inputs itself, which the cotangents alone would not show wrong (a rule's
    cotangents at the head are the seeds whatever its inputs). A rule whose cotangents
    are all zero on ``x`` (every unit before it off on these examples) leaves the
    chain's backward to it unchecked: the chain is then not taken.
    """
    try:
        _, per_rule = chain.capture(x, rules, weights=check_weights(f.shape[1], f).squeeze(1))
        for rule in rules:
            expected = inputs[rule]
            if len(expected) != len(rule.inputs):
                return False
            for want, got in zip(expected, rule.inputs):
                if want.shape != got.shape or not _close(got, want, tol):
                    return False
    except Exception:
        # shapes the chain does not cover, or a layer that fails outside autograd
        return False
    finally:
        for rule in rules:
            rule.clear()
    for rule, cotangents in zip(rules, per_rule):
        expected = reference[rule]
        if len(expected) != len(cotangents):
            return False
        if not any(bool(want.any()) for want in expected):
            return False
        for want, got in zip(expected, cotangents):
            if want.shape != got.shape or not _close(got, want, tol):
                return False
    return True


def check_weights(outputs: int, like: torch.Tensor) -> torch.Tensor:
    """``[O, 1]``: the fixed weights of the outputs in the checks, of random signs and sizes in [0.5, 1.5).

    The checks compare gradients of ``Σ_o w_o f_o``: with all weights 1, outputs
    that sum to a constant (a head with rows w and −w) would leave nothing to
    compare, and an error that swaps outputs would not show. With weights of one
    sign, outputs that move together (pixels sharing a brightness) add up to O
    times one of them, and an error in one output hid below the checks' tolerance
    from O ≈ 500; with random signs their sum grows like √O.
    """
    gen = torch.Generator(device="cpu").manual_seed(1)
    weights = torch.rand(outputs, 1, generator=gen, dtype=torch.float64) + 0.5
    signs = 2 * torch.randint(0, 2, (outputs, 1), generator=gen, dtype=torch.float64) - 1
    return (weights * signs).to(dtype=like.dtype, device=like.device)


def _rank_one_direction(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random tensor shaped like ``like``: the outer product of one uniform vector per axis."""
    direction = torch.ones((), dtype=like.dtype, device=like.device)
    for size in like.shape:
        factor = torch.rand(size, generator=gen, dtype=torch.float64) - 0.5
        direction = direction.unsqueeze(-1) * factor.to(dtype=like.dtype, device=like.device)
    return direction


# (the module holding the parameter, its attribute there, the parameter, its stand-in)
_StandIn = Tuple[torch.nn.Module, str, torch.Tensor, torch.Tensor]


def _parameter_stand_ins(rule: StructuredRule) -> List[_StandIn]:
    """For each parameter of ``rule``, a stand-in: a leaf of its own that shares its values."""
    entries = []
    for local in rule.names:
        path, _, attr = local.rpartition(".")
        owner = rule.module.get_submodule(path) if path else rule.module
        param = owner._parameters.get(attr)
        if param is not None:
            entries.append((owner, attr, param, torch.nn.Parameter(param.detach())))
    return entries


@contextlib.contextmanager
def _outside_uses_marked(rules: Sequence[StructuredRule]) -> Iterator[Dict[StructuredRule, List[_StandIn]]]:
    """Within the block, outside their modules' calls the parameters of the module ``rules``
    are stand-ins (`_parameter_stand_ins`); yields them by rule, for `_used_outside`."""
    stand_ins = {rule: _parameter_stand_ins(rule) for rule in rules if rule.module is not None}
    stand_ins = {rule: entries for rule, entries in stand_ins.items() if entries}
    handles = []
    try:
        for rule, entries in stand_ins.items():
            _swap(entries, inside=False)
            # last of the module's pre-hooks and first of its hooks: only its own forward sees them
            handles.append(rule.module.register_forward_pre_hook(
                lambda module, args, entries=entries: _swap(entries, inside=True)))
            handles.append(rule.module.register_forward_hook(
                lambda module, args, output, entries=entries: _swap(entries, inside=False),
                prepend=True, always_call=True))
        yield stand_ins
    finally:
        for handle in handles:
            handle.remove()
        for entries in stand_ins.values():
            _swap(entries, inside=True)


def _used_outside(stand_ins: Dict[StructuredRule, List[_StandIn]], y: torch.Tensor) -> List[StructuredRule]:
    """The rules whose stand-ins the autograd graph of ``y`` reaches: their parameters were used
    outside their modules' calls."""
    if not stand_ins:
        return []
    reached = _leaves_reached(y)
    return [rule for rule, entries in stand_ins.items()
            if any(id(stand_in) in reached for _, _, _, stand_in in entries)]


def _swap(entries: List[_StandIn], inside: bool) -> None:
    """Give the modules their parameters (``inside`` their rule's module call) or the stand-ins."""
    for owner, attr, param, stand_in in entries:
        owner._parameters[attr] = param if inside else stand_in


def _leaves_reached(y: torch.Tensor) -> set:
    """The ids of the leaf tensors whose gradient the autograd graph of ``y`` accumulates."""
    stack = [y.grad_fn] if isinstance(y, torch.Tensor) and y.grad_fn is not None else []
    seen, leaves = set(), set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)
        if leaf is not None:
            leaves.add(id(leaf))
        stack.extend(following for following, _ in node.next_functions)
    return leaves


@contextlib.contextmanager
def _expanded_parameters_quietly() -> Iterator[None]:
    """Without torch's warning about ``.T`` on tensors of more than two axes: a forward
    that transposes a matrix parameter with ``.T`` meets it on the batch-expanded copy
    (the rule check then refuses the copy), never on the user's own tensors."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The use of `x\.T` on tensors of dimension other than 2")
        yield


def _zeros_if_none(g: Optional[torch.Tensor], target: torch.Tensor, batch: int = 0) -> torch.Tensor:
    if g is not None:
        return g
    shape = ((batch,) if batch else ()) + tuple(target.shape)
    return torch.zeros(shape, dtype=target.dtype, device=target.device)
