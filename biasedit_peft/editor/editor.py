"""``BiasEditor``: the MALMEN hyper-networks of one model, the edit pipeline, and editor folders.

An edit is: cache keys and value gradients of the debias loss at every edited layer
(:meth:`BiasEditor.cache_samples`), map them to value changes with the hyper-network and solve the
ridge problem per layer (:meth:`BiasEditor.predict`), then write the factored deltas into the adapter
(:meth:`BiasEditor.debias`). Meta-training (``trainer.py``) adds :meth:`BiasEditor.meta_backward`.
"""

from __future__ import annotations

import os
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..distributed import SINGLE, Processes, as_processes, split_for
from ..profiling import EDITOR_RANGE, float32_range
from ..scoring import check_context, eval_mode, inverse_permutation, logit_positions, model_context_length
from ..tuner.layout import DeltaLike, add_deltas, native_factors, stored_delta
from .cache import EditSample, KeyValueCache, as_edit_sample, record_layer_io
from .losses import LOSS_KINDS, pair_debias_loss, pair_scores
from .nets import EditorNet, batch_statistics, check_block_init
from .solve import RidgeDelta, RidgeSolution, solve_ridge

EDITOR_FORMAT = "biasedit-editor/1"


@dataclass
class BiasEditorConfig:
    """Everything needed to rebuild an editor (saved as ``config.json``)."""

    targets: dict[str, list[int]]
    """Edited module name -> ``[key_size, value_size]`` (the layer's ``[in_features, out_features]``)."""
    rank: int = 1920
    """Rank of each residual block (capped by ``key_size + value_size``)."""
    n_blocks: int = 2
    lr: float = 1e-6
    """Initial per-module step size ``lr[m]``."""
    block_init: str = "unit"
    """How the blocks' ``A`` are drawn (``nets.BLOCK_INITS``): ``"unit"`` (MALMEN's N(0, 1)) or ``"fan_in"``."""
    loss: str = "token"
    """Debias / retention loss variant: ``"token"`` (default, better on the testbed), ``"abs"`` (the absolute gap:
    its minimum over a shared shift is at the median gap, where SS is 50) or ``"paper"`` (the BiasEdit code's
    semantics); see ``losses.py`` and docs/method.md."""
    chunk_size: int = 4096
    """Token rows the hyper-network processes at once (independent of the LM batch size)."""
    base_model: str | None = None
    format: str = EDITOR_FORMAT

    def __post_init__(self):
        if not self.targets:
            raise ValueError("An editor needs at least one target module")
        if self.loss not in LOSS_KINDS:
            raise ValueError(f"Unknown loss {self.loss!r}; choose one of {LOSS_KINDS}")
        check_block_init(self.block_init)
        for name in ("rank", "n_blocks", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        self.targets = {name: [int(size) for size in shape] for name, shape in self.targets.items()}


@dataclass
class DebiasReport:
    """What :meth:`BiasEditor.debias` did."""

    n_samples: int
    n_tokens: int
    layers: list[str]


def shape_key(key_size: int, value_size: int) -> str:
    return f"{key_size}x{value_size}"


def _chunks(n_rows: int, chunk_size: int) -> Iterable[slice]:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    return (slice(start, start + chunk_size) for start in range(0, n_rows, chunk_size))


@torch.no_grad()
def predicted_changes(net: EditorNet, index: int, keys: torch.Tensor, value_grads: torch.Tensor,
                      chunk_size: int) -> torch.Tensor:
    """The value changes ``D [N, d_out]`` the net predicts for ``keys [N, d_in]`` and ``value_grads [N, d_out]``, in
    chunks of ``chunk_size`` rows (no autograd)."""
    return torch.cat([net.value_changes(keys[c], value_grads[c], index) for c in _chunks(len(keys), chunk_size)])


def predict_layer(net: EditorNet, index: int, keys: torch.Tensor, value_grads: torch.Tensor, chunk_size: int,
                  processes: Processes = SINGLE):
    """Value changes in chunks (no autograd), then the ridge solve -> :class:`RidgeSolution`; with several
    ``processes`` the rows are this process's and the solve is over all of theirs (``solve_ridge``)."""
    changes = predicted_changes(net, index, keys, value_grads, chunk_size)
    return solve_ridge(keys, changes, net.ridge(index), processes=processes)


def meta_backward_layer(
    net: EditorNet,
    index: int,
    keys: torch.Tensor,
    value_grads: torch.Tensor,
    solution: RidgeSolution,
    delta_grad: torch.Tensor,
    chunk_size: int,
    count_ridge: bool = True,
) -> None:
    """Accumulate ``dL/dtheta`` into ``net`` given ``delta_grad = dL/dS [d_in, d_out]`` (MALMEN's decoupling).

    The solve's closed-form backward gives ``dL/dD`` and ``dL/dlambda``; the hyper-network is then
    re-run chunk by chunk and ``<dL/dD, D(theta)>`` back-propagated, so memory is one chunk's graph.
    ``keys`` / ``value_grads`` are this process's rows; ``count_ridge``: add the ``lambda`` term (which every
    process computes whole: only one of several processes adds it, so the summed gradient counts it once).
    """
    change_grads, ridge_grad = solution.backward(delta_grad.to(keys.device))
    if solution.rows is not None:  # a dual solved across processes: this process's rows of all of them
        change_grads = change_grads[solution.rows]
    if count_ridge:
        (ridge_grad * net.ridge(index)).backward()
    for chunk in _chunks(len(keys), chunk_size):
        (change_grads[chunk] * net.value_changes(keys[chunk], value_grads[chunk], index)).sum().backward()


def input_device(model: nn.Module) -> torch.device:
    """Where token ids must go (the input embeddings' device; works with accelerate device maps)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def encode_pairs(tokenizer, samples: Sequence[EditSample]):
    """One padded batch of ``2P`` sentences, stereotypes then anti-stereotypes (validate with :func:`length_order`)."""
    from ..scoring import encode_sentences

    return encode_sentences(tokenizer, [s.stereotype for s in samples] + [s.anti_stereotype for s in samples])


def length_order(tokenizer, samples: Sequence[EditSample], context: int | None = None) -> torch.Tensor:
    """Indices ``[P]`` of ``samples``, longest pair first (in tokens; stable), so LM batches pad little.

    Also rejects a sentence that tokenizes to nothing, naming the sample and field, and one longer than the
    model's ``context`` with its BOS (``scoring.check_context``).
    """
    sentences = [s.stereotype for s in samples] + [s.anti_stereotype for s in samples]
    lengths = torch.tensor([len(ids) for ids in tokenizer(sentences, add_special_tokens=False)["input_ids"]])
    empty = (lengths == 0).nonzero().flatten().tolist()
    if empty:
        row = empty[0]
        field_name = "stereotype" if row < len(samples) else "anti_stereotype"
        raise ValueError(f"Sample {row % len(samples)}: field {field_name!r} ({sentences[row]!r}) tokenizes to "
                         "no scored tokens")
    check_context((lengths + 1).tolist(), [f"sample {i % len(samples)}: {text}" for i, text in enumerate(sentences)],
                  context)
    pair_lengths = torch.maximum(lengths[:len(samples)], lengths[len(samples):])
    return torch.argsort(pair_lengths, descending=True, stable=True)


def forward_logits(model: nn.Module, batch) -> torch.Tensor:
    device = input_device(model)
    return model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                 use_cache=False).logits


class BiasEditor(nn.Module):
    """One :class:`EditorNet` per distinct ``(key_size, value_size)`` of the edited layers.

    Example::

        editor = BiasEditor.for_model(peft_model)
        editor.debias(peft_model, samples, tokenizer=tokenizer)   # writes deltas into the adapter
    """

    def __init__(self, config: BiasEditorConfig):
        super().__init__()
        self.config = config
        self.provenance: dict[str, Any] = {}
        """Training provenance for the model card (``editor_model_card`` keywords); not saved in ``config.json``."""
        counts: Counter[str] = Counter()
        self.module_index: dict[str, tuple[str, int]] = {}
        for name, (key_size, value_size) in config.targets.items():
            key = shape_key(key_size, value_size)
            self.module_index[name] = (key, counts[key])
            counts[key] += 1
        self.nets = nn.ModuleDict({
            key: EditorNet(*map(int, key.split("x")), config.rank, config.n_blocks, n_modules, config.lr,
                           config.block_init)
            for key, n_modules in counts.items()
        })

    # ----- construction -----------------------------------------------------------------------------
    @classmethod
    def for_model(cls, peft_model: nn.Module, targets: Sequence[str] | None = None, **config: Any) -> "BiasEditor":
        """An untrained editor for the BiasEdit layers of ``peft_model``.

        Args:
            peft_model: A ``PeftModel`` with a BiasEdit adapter.
            targets: Base module names to edit (default: every BiasEdit layer).
            config: Other :class:`BiasEditorConfig` fields (``rank``, ``n_blocks``, ``lr``, ``loss``, ...).

        Raises:
            ValueError: A target is not a BiasEdit layer of the model.
        """
        layers = _edit_layers(peft_model)
        if targets is not None:
            unknown = sorted(set(targets) - set(layers))
            if unknown:
                raise ValueError(f"Modules {unknown} are not BiasEdit layers of the model; it has {sorted(layers)}")
            layers = {name: layers[name] for name in targets}
        config.setdefault("base_model", _base_model_name(peft_model))
        shapes = {name: [layer.in_features, layer.out_features] for name, layer in layers.items()}
        return cls(BiasEditorConfig(targets=shapes, **config))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def net_for(self, name: str) -> tuple[EditorNet, int]:
        key, index = self.module_index[name]
        return self.nets[key], index

    def check_compatible(self, peft_model: nn.Module) -> dict[str, nn.Module]:
        """The model's edited layers, after checking they match this editor's targets and shapes."""
        layers = _edit_layers(peft_model)
        missing = [name for name in self.config.targets if name not in layers]
        if missing:
            raise ValueError(
                f"The editor edits {missing}, which are not BiasEdit layers of this model (it has {sorted(layers)}). "
                f"The editor was trained for {self.config.base_model!r}."
            )
        wrong = {
            name: (shape, [layers[name].in_features, layers[name].out_features])
            for name, shape in self.config.targets.items()
            if shape != [layers[name].in_features, layers[name].out_features]
        }
        if wrong:
            details = ", ".join(f"{n}: editor {e} vs model {m}" for n, (e, m) in wrong.items())
            raise ValueError(f"Layer shapes differ between editor and model ([in, out]): {details}")
        return {name: layers[name] for name in self.config.targets}

    # ----- the edit pipeline -------------------------------------------------------------------------
    def cache_samples(
        self,
        peft_model: nn.Module,
        tokenizer,
        samples: Sequence[EditSample],
        batch_size: int = 16,
        update_normalizers: bool = False,
        progress: bool = False,
    ) -> tuple[KeyValueCache, torch.Tensor, torch.Tensor]:
        """Keys and value gradients of the debias loss at every target.

        The loss is the *sum* of the per-pair losses, so each token's value gradient is that of its own pair's
        loss: it depends neither on the LM batch size nor on how many samples are edited together (an editor
        trained on edits of 32 samples sees gradients of the same scale in a joint edit of 10,000).

        Args:
            peft_model: The model with the BiasEdit adapter the editor was made for.
            tokenizer: Its tokenizer.
            samples: ``P`` edit samples (stereotype, anti-stereotype[, unrelated]).
            batch_size: Sentence pairs per LM forward pass.
            update_normalizers: Fold the cached rows into the nets' normalisers (meta-training).
            progress: Show a progress bar.

        Returns:
            ``(cache, stereo [P], anti [P])``: the :class:`KeyValueCache` and the pre-edit mean token log-probs of
            the stereotypes and anti-stereotypes, in input order.
        """
        layers = self.check_compatible(peft_model)
        cache = KeyValueCache()
        stereo_scores, anti_scores = [], []
        order = length_order(tokenizer, samples, model_context_length(peft_model))  # batches of similar lengths
        ordered = [samples[i] for i in order.tolist()]
        starts = range(0, len(samples), batch_size)
        with record_layer_io(layers) as recorder, eval_mode(peft_model):
            for start in tqdm(starts, desc="caching", disable=not progress, leave=False):
                chunk = ordered[start:start + batch_size]
                batch = encode_pairs(tokenizer, chunk)
                with torch.enable_grad():
                    logits = forward_logits(peft_model, batch)
                    stereo, anti = pair_scores(logits, batch.to(logits.device))  # the vocabulary pass, once
                    loss = pair_debias_loss(self.config.loss, stereo, anti).sum()  # per-pair losses
                    taken = recorder.take(loss, logit_positions(batch.target_mask), self.device)
                cache.update(taken)
                if update_normalizers:
                    self.update_normalizers(taken)
                stereo_scores.append(stereo.mean.detach().cpu())
                anti_scores.append(anti.mean.detach().cpu())
        inverse = inverse_permutation(order)
        return cache, torch.cat(stereo_scores)[inverse], torch.cat(anti_scores)[inverse]

    @torch.no_grad()
    def update_normalizers(self, taken: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for name, (keys, value_grads) in taken.items():
            net, _ = self.net_for(name)
            net.normalizer.update(torch.cat((keys, value_grads), -1))

    def predict(self, cache: KeyValueCache, chunk_size: int | None = None,
                processes: Processes = SINGLE) -> dict[str, RidgeSolution]:
        """The ridge solution (delta in key -> value layout ``[d_in, d_out]``) for every target layer.

        Args:
            cache: What :meth:`cache_samples` returned.
            chunk_size: Token rows per hyper-network call (default ``config.chunk_size``).
            processes: Several processes, each with the cache of its own samples: one solve over all of them.

        Raises:
            RuntimeError: The editor has no normaliser statistics (untrained).
        """
        self._check_normalizers()
        solutions = {}
        with float32_range(EDITOR_RANGE):
            for name in self.config.targets:
                net, index = self.net_for(name)
                keys, value_grads = cache.layer(name)
                solutions[name] = predict_layer(net, index, keys, value_grads, chunk_size or self.config.chunk_size,
                                                processes)
        return solutions

    def meta_backward(
        self, cache: KeyValueCache, solutions: dict[str, RidgeSolution], delta_grads: dict[str, torch.Tensor],
        count_ridge: bool = True,
    ) -> None:
        """Accumulate editor gradients from ``dL/dS`` of every layer (``[d_in, d_out]`` each); ``count_ridge``:
        see :func:`meta_backward_layer`."""
        with float32_range(EDITOR_RANGE):
            for name, delta_grad in delta_grads.items():
                net, index = self.net_for(name)
                keys, value_grads = cache.layer(name)
                meta_backward_layer(net, index, keys, value_grads, solutions[name], delta_grad,
                                    self.config.chunk_size, count_ridge)

    @torch.no_grad()
    def merge_normalizers(self, cache: KeyValueCache, processes: Processes) -> None:
        """Fold every process's cached rows into the nets' normalisers, layer by layer: each process's
        ``(count, mean, sum of squared deviations)`` is gathered and merged in rank order, so every process ends
        with the statistics of all rows (what one process's per-batch updates give, up to rounding)."""
        for name in cache.names:
            keys, value_grads = cache.layer(name)
            count, mean, sum_sq = batch_statistics(torch.cat((keys, value_grads), -1))
            local = torch.cat((count.reshape(1), mean, sum_sq))
            normalizer = self.net_for(name)[0].normalizer
            for part in processes.gather_rows(local.unsqueeze(0)):
                part_count, part_mean, part_sum_sq = part.split([1, len(mean), len(mean)])
                normalizer.merge(part_count[0], part_mean, part_sum_sq)

    def _check_normalizers(self) -> None:
        for key, net in self.nets.items():
            if net.normalizer.count < 2:
                raise RuntimeError(
                    f"Editor net {key} has no normaliser statistics: train it (BiasEditTrainer) before editing"
                )

    def joint_solutions(
        self,
        peft_model: nn.Module,
        samples: Sequence[Any],
        tokenizer=None,
        batch_size: int = 16,
        chunk_size: int | None = None,
        progress: bool = True,
        processes: Any | None = None,
    ) -> tuple[dict[str, RidgeSolution], DebiasReport]:
        """One joint solve over all ``samples`` (nothing is written): ``(solutions, report)``.

        Args:
            peft_model: The model with the BiasEdit adapter the editor was made for.
            samples: StereoSet items, dicts or ``(stereotype, anti_stereotype[, unrelated])`` tuples; under several
                processes the same full list on each.
            tokenizer: The model's tokenizer (default: loaded from the model's ``name_or_path``).
            batch_size: Sentence pairs per LM forward pass while caching.
            chunk_size: Token rows per hyper-network call (independent of ``batch_size``).
            progress: Show a progress bar.
            processes: The processes to split the work across (``biasedit_peft.distributed``): ``Processes`` or an
                ``Accelerator``; default: those of ``accelerate launch`` / ``torchrun`` when launched so, else this
                one. Each caches its own block of the samples; the solve sums (primal) or gathers (dual) their
                rows, so every process gets the solutions one process computes from all samples.

        Raises:
            ValueError: No samples (or fewer than processes), or a sample without text or that tokenizes to nothing.
        """
        if len(samples) == 0:
            raise ValueError("debias() needs at least one sample; got an empty list")
        processes = as_processes(processes)
        edit_samples = [as_edit_sample(sample, index) for index, sample in enumerate(samples)]
        tokenizer = tokenizer if tokenizer is not None else _load_tokenizer_for(peft_model)
        cache, _, _ = self.cache_samples(peft_model, tokenizer, split_for(processes, edit_samples), batch_size,
                                         progress=progress and processes.is_main)
        solutions = self.predict(cache, chunk_size, processes)
        return solutions, DebiasReport(len(edit_samples), processes.sum_int(cache.n_tokens),
                                       list(self.config.targets))

    def write_solutions(self, peft_model: nn.Module, solutions: dict[str, RidgeSolution],
                        adapter_name: str = "default") -> None:
        """Add ``solutions`` to adapter ``adapter_name`` (exactly, as a longer factorisation)."""
        layers = self.check_compatible(peft_model)
        _write_added_deltas(peft_model, layers, {name: solutions[name].delta for name in solutions}, adapter_name)

    def debias(
        self,
        peft_model: nn.Module,
        samples: Sequence[Any],
        tokenizer=None,
        adapter_name: str = "default",
        batch_size: int = 16,
        chunk_size: int | None = None,
        progress: bool = True,
    ) -> DebiasReport:
        """Compute one joint debias delta from ``samples`` and add it to adapter ``adapter_name``.

        One solve over all samples (:meth:`joint_solutions`); the new delta is added to the adapter's current one
        (:meth:`write_solutions`). On any error nothing is written. The paper's per-batch evaluation (edit, score,
        undo) is :func:`biasedit_peft.workflows.protocols.per_batch_protocol`; a deployable adapter, its strength
        calibrated on held-out pairs, is :func:`biasedit_peft.workflows.deployment.deployable_adapter`.

        Args:
            peft_model: The model with the BiasEdit adapter the editor was made for.
            samples: StereoSet items, dicts or ``(stereotype, anti_stereotype[, unrelated])`` tuples.
            tokenizer: The model's tokenizer (default: loaded from the model's ``name_or_path``).
            adapter_name: The adapter to write.
            batch_size: Sentence pairs per LM forward pass while caching.
            chunk_size: Token rows per hyper-network call (independent of ``batch_size``).
            progress: Show a progress bar.

        Raises:
            ValueError: No samples, or a sample without text or that tokenizes to nothing.
        """
        _current_deltas(self.check_compatible(peft_model), adapter_name)  # fails early if the adapter misses a layer
        solutions, report = self.joint_solutions(peft_model, samples, tokenizer, batch_size, chunk_size, progress)
        self.write_solutions(peft_model, solutions, adapter_name)
        return report

    @contextmanager
    def edited(self, peft_model: nn.Module, solutions: dict[str, RidgeSolution],
               adapter_name: str = "default") -> Iterator[None]:
        """Within the block, ``peft_model`` behaves as if ``solutions`` were added to adapter ``adapter_name``.

        Functional (``override_deltas``): nothing is written, so leaving the block restores the model exactly.
        """
        from ..tuner.deltas import override_deltas

        layers = self.check_compatible(peft_model)
        current = _current_deltas(layers, adapter_name)
        added = {name: _native(layers[name], solutions[name].delta, current.get(name)) for name in solutions}
        with override_deltas(peft_model, added, adapter_name):
            yield

    # ----- editor folders (editor/folders.py) ------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, **card_info: Any) -> None:
        """Write the editor folder: ``config.json``, ``editor.safetensors`` and the model card ``README.md``
        (:func:`~biasedit_peft.editor.folders.save_editor`)."""
        from .folders import save_editor

        save_editor(self, save_directory, **card_info)

    def model_card(self, **card_info: Any):
        """The editor's ``huggingface_hub.ModelCard`` (:func:`~biasedit_peft.editor.folders.editor_card`)."""
        from .folders import editor_card

        return editor_card(self, **card_info)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, device: str | torch.device | None = None,
                        **hub_kwargs: Any) -> "BiasEditor":
        """Load an editor folder, or download one from the Hub (:func:`~biasedit_peft.editor.folders.load_editor`)."""
        from .folders import load_editor

        return load_editor(path_or_repo_id, device, editor_class=cls, **hub_kwargs)

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload BiasEdit editor") -> str:
        """Upload the editor folder in one commit; returns the commit URL
        (:func:`~biasedit_peft.editor.folders.push_editor`)."""
        from .folders import push_editor

        return push_editor(self, repo_id, private=private, token=token, commit_message=commit_message)


# ----- helpers ---------------------------------------------------------------------------------------
def _edit_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    from ..tuner.deltas import edit_targets

    layers = edit_targets(peft_model)
    if not layers:
        raise ValueError("The model has no BiasEdit layers; wrap it with get_peft_model(model, BiasEditConfig())")
    return layers


def _base_model_name(peft_model: nn.Module) -> str | None:
    config = getattr(peft_model, "config", None)
    return getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None) or None


def _load_tokenizer_for(peft_model: nn.Module):
    name = _base_model_name(peft_model)
    if not name:
        raise ValueError("Pass tokenizer=...: the model does not record which base model it came from")
    from ..models import load_tokenizer

    return load_tokenizer(name)


def _native(layer: nn.Module, delta: RidgeDelta, current: DeltaLike | None = None) -> DeltaLike:
    """``delta`` in the layer's native layout and device, added to ``current`` (``tuner.layout.add_deltas``)."""
    device = layer.get_base_layer().weight.device
    new = native_factors(delta.left.to(device), delta.right.to(device), layer.fan_in_fan_out)
    return add_deltas(current, new, layer.weight_shape)


def _current_deltas(layers: dict[str, nn.Module], adapter_name: str) -> dict[str, DeltaLike]:
    """Non-zero stored deltas of ``adapter_name`` (``tuner.layout.stored_delta``)."""
    stored = {}
    for name, layer in layers.items():
        try:
            delta = stored_delta(layer, adapter_name)
        except KeyError:
            raise KeyError(f"Adapter {adapter_name!r} does not cover {name!r}") from None
        if delta is not None:
            stored[name] = delta
    return stored


def _write_added_deltas(peft_model, layers, deltas: dict[str, RidgeDelta], adapter_name: str) -> None:
    from ..tuner.deltas import set_deltas

    current = _current_deltas(layers, adapter_name)
    set_deltas(peft_model, {name: _native(layers[name], deltas[name], current.get(name)) for name in deltas},
               adapter_name)


