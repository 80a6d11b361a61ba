"""Extension points: a packing strategy is its module and one registry line; nested
settings; an older run record's flat keys still resume."""

import dataclasses
import types

import grain
import numpy as np
import pytest

from lcx.packing import DocumentPieces, Strategy, strategies
from lcx.packing.rows import packed_row
from lcx.train import run_record, train_and_evaluate
from lcx.train.metrics import read_metrics


@dataclasses.dataclass(frozen=True)
class NextFitSettings:
    """config.data.next_fit: the toy strategy's one setting."""

    reverse: bool  # documents last to first


def next_fit_rows(corpus, opts):
    """Next-fit: pieces in corpus order, a new row whenever the next piece does not fit."""
    pieces = DocumentPieces(corpus, opts.seq_len)
    order = range(len(pieces))[:: -1 if opts.settings.reverse else 1]
    bins, fill = [[]], 0
    for i in order:
        n = int(pieces.ends[i] - pieces.starts[i])
        if fill + n > opts.seq_len:
            bins, fill = [*bins, []], 0
        bins[-1].append(i)
        fill += n
    rows = [packed_row([pieces[i]["tokens"] for i in b], opts.seq_len, opts.pad_id) for b in bins]
    ds = grain.MapDataset.source(rows[opts.shard_index :: opts.shard_count])
    ds = ds.repeat(opts.num_epochs).to_iter_dataset()
    return ds.batch(opts.batch_size, drop_remainder=opts.num_epochs is None)


@pytest.fixture
def next_fit_registered(monkeypatch):
    """REGISTRY with one more line, as a new strategy's module would add it."""
    registry = {**strategies.REGISTRY, "next_fit": Strategy(next_fit_rows, NextFitSettings)}
    monkeypatch.setattr(strategies, "REGISTRY", types.MappingProxyType(registry))


def test_a_registered_strategy_trains_a_smoke_step(next_fit_registered, smoke_config, tmp_path):
    c = smoke_config
    c.data.packing = "next_fit"
    c.data.next_fit = dict(reverse=True)
    c.train.update(steps=1, eval_every=1, checkpoint_every=1)
    last = train_and_evaluate(c, str(tmp_path / "run"))
    train = [r for r in read_metrics(str(tmp_path / "run")) if "loss" in r]
    assert [r["step"] for r in train] == [1] and np.isfinite(train[0]["loss"])
    assert 0 <= train[0]["padding_fraction"] < 1 and np.isfinite(last["eval_loss"])


def test_strategy_settings_are_checked(next_fit_registered, smoke_config, tmp_path):
    c = smoke_config
    c.data.packing = "next_fit"
    with pytest.raises(ValueError, match=r"data.next_fit is needed .*\['reverse'\]"):
        train_and_evaluate(c, str(tmp_path / "a"))
    c.data.next_fit = dict(reverse=True, extra=1)
    with pytest.raises(ValueError, match=r"needs exactly the keys \['reverse'\]"):
        train_and_evaluate(c, str(tmp_path / "b"))
    c.data.packing = "zigzag"
    with pytest.raises(ValueError, match=r"data.packing='zigzag'; valid: .*'next_fit'"):
        train_and_evaluate(c, str(tmp_path / "c"))


def test_optimizer_and_schedule_settings_are_checked(smoke_config, tmp_path):
    c = smoke_config
    c.optimizer.lamb.beta = 0.9
    c.optimizer.name = "lamb"
    with pytest.raises(ValueError, match=r"optimizer.lamb: unknown \['beta'\]; lamb takes"):
        train_and_evaluate(c, str(tmp_path / "a"))
    c.optimizer.name = "sgd"
    with pytest.raises(ValueError, match=r"optimizer.name='sgd'; valid: \['adagrad'"):
        train_and_evaluate(c, str(tmp_path / "b"))


def test_an_older_record_with_flat_keys_resumes(smoke_config):
    current = run_record.flatten(smoke_config)
    old = {k: v for k, v in current.items() if not k.startswith(("data.dd.", "model.lact."))}
    old = {k: v for k, v in old.items() if ".first_fit." not in k and ".best_fit." not in k}
    old = {k: v for k, v in old.items() if not k.startswith(("optimizer.", "schedule.power."))}
    old |= {"data.num_packing_bins": 128, "optimizer.name": "adamw", "optimizer.grad_clip": 1.0}
    old |= {f"data.dd_{k}": current[f"data.dd.{k}"] for k in ("min_log2", "max_log2")}
    old |= {"data.dd_curriculum": "grow_p2", "data.dd_cycles": 1}
    old |= {"optimizer.b1": 0.9, "optimizer.b2": 0.95, "optimizer.eps": 1e-8}
    old |= {"optimizer.weight_decay": 0.1, "optimizer.initial_accumulator_value": 0.1}
    old |= {"schedule.power_a": 4.0, "schedule.power_b": -0.51}
    lact = {k[len("model.lact.") :]: v for k, v in current.items() if k.startswith("model.lact.")}
    old |= {f"model.lact_{k}": v for k, v in lact.items() if k != "grid"}
    assert run_record.differences(old, smoke_config) == {}
    old["data.dd_max_log2"] += 1
    assert set(run_record.differences(old, smoke_config)) == {"data.dd.max_log2"}
