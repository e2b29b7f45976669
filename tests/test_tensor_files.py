"""Safetensors files written and read a tensor at a time (issue 31 item 4): the same bytes as safetensors' own
writer, one tensor held at a time, and a study's merge spooled module by module into its store."""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergelab.merging import merge, merge_modules
from mergelab.synthetic import random_taskset
from mergelab.taskset import MergedUpdate, StoredUpdates, update_tensors
from mergelab.tensor_files import FileTensors, Spool, write_safetensors

TENSORS = {"m::B": torch.randn(5, 3), "a::delta": torch.randn(4, dtype=torch.float64), "scalar": torch.tensor(3.0),
           "half": torch.ones(2, 2, dtype=torch.float16), "brain": torch.zeros(2, dtype=torch.bfloat16), "empty": torch.zeros(0, 3),
           "ids": torch.arange(4), "mask": torch.tensor([True, False]), "ü": torch.randn(3)}


SHAPES = {"blocks.0.attn.weight": (12, 10), "blocks.0.mlp.weight": (16, 12), "blocks.1.mlp.weight": (16, 12)}


@pytest.fixture
def taskset3():
    return random_taskset(SHAPES, 3, rank=2, seed=3)


class Counted(Mapping[str, torch.Tensor]):
    """Tensors made fresh on every read, counting how many are alive at once."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors, self.alive, self.most = tensors, 0, 0

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self.tensors[name].clone()
        self.alive += 1
        self.most = max(self.most, self.alive)
        weakref.finalize(t, self._freed)
        return t

    def _freed(self) -> None:
        self.alive -= 1

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


@pytest.mark.parametrize("metadata", [None, {}, {"provenance": '{"where": "é\\n/<>", "n": [1, 2]}'}])
def test_the_writer_writes_safetensors_own_bytes_holding_one_tensor_at_a_time(tmp_path, metadata):
    save_file(TENSORS, tmp_path / "theirs.safetensors", metadata)
    counted = Counted(TENSORS)
    write_safetensors(tmp_path / "ours.safetensors", counted, metadata)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()
    assert counted.most == 1


def test_file_tensors_read_one_tensor_when_asked_in_load_files_order(tmp_path):
    save_file(TENSORS, tmp_path / "t.safetensors")
    lazy, loaded = FileTensors(tmp_path / "t.safetensors"), load_file(tmp_path / "t.safetensors")
    assert list(lazy) == list(loaded) and len(lazy) == len(TENSORS) and "ids" in lazy and "nothing" not in lazy
    assert all(torch.equal(lazy[k], v) for k, v in loaded.items())
    with pytest.raises(KeyError):
        lazy["nothing"]


def test_a_spool_reads_back_what_was_written_and_is_removed_with_it(tmp_path):
    spool = Spool(tmp_path / "spool")
    for name, t in TENSORS.items():
        spool[name] = t
    assert list(spool) == list(TENSORS) and all(torch.equal(spool[k], v) for k, v in TENSORS.items())
    with pytest.raises(KeyError):
        spool["ids"] = torch.zeros(1)
    with pytest.raises(KeyError):  # no safetensors dtype: the write fails and the name is not spooled
        spool["complex"] = torch.zeros(1, dtype=torch.complex128)
    assert "complex" not in spool and list(spool) == list(TENSORS)
    write_safetensors(tmp_path / "spooled.safetensors", spool)
    save_file(TENSORS, tmp_path / "direct.safetensors")
    assert (tmp_path / "spooled.safetensors").read_bytes() == (tmp_path / "direct.safetensors").read_bytes()
    folder = spool.folder
    del spool
    assert not folder.exists()


def test_merge_modules_hands_each_module_on_once_as_merge_collects_them(taskset3):
    seen: dict = {}

    def emit(name, update):
        assert name not in seen
        seen[name] = update

    meta = merge_modules(emit, taskset3, "ties", "full", density=0.5)
    merged = merge(taskset3, "ties", "full", density=0.5)
    assert meta == merged.meta and set(seen) == set(merged.modules)
    assert all(torch.equal(seen[m].dense(), u.dense()) for m, u in merged.modules.items())


def test_a_spooled_merge_is_published_as_the_merged_updates_tensors_and_read_back_a_module_at_a_time(store, taskset3):
    merged = merge(taskset3, "task_arithmetic", "full", alpha=0.3)
    key = store.key("merge", "test", case="spooled")
    spool = store.spool(key)
    assert spool.folder.parent.name == "staging"
    for module, update in merged.modules.items():
        for name, t in update_tensors(module, update).items():
            spool[name] = t
    store.put_tensors(key, spool, {"method": "task_arithmetic"})
    other = store.key("merge", "test", case="direct")
    store.put_tensors(other, merged.to_tensors())
    folder = spool.folder
    del spool
    assert not folder.exists()
    stored = StoredUpdates(store.tensors(key))
    assert list(stored) == list(MergedUpdate.from_tensors(store.get_tensors(other)).modules)
    assert all(torch.equal(stored[m].dense(), u.dense()) for m, u in merged.modules.items())
