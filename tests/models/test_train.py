"""visattn train: a short run learns, and 2-process DDP (gloo, CPU) matches one process exactly."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.nn.functional as F

from visattn.train import TrainConfig, build_demo_model, digits_dataset, init_distributed, train

pytest.importorskip("sklearn", reason="the digits data set ships with scikit-learn")

# Small and fast: 16x16 digits give 4x4, 2x2, 1x1 maps (every window rule still runs).
_QUICK = dict(img_size=16, batch_size=32, lr=3e-3, warmup_epochs=0.2, label_smoothing=0.0, max_shift=0,
              progress=False)


def test_digits_split_is_stratified_and_standardized():
    (x_tr, _), (x_val, y_val) = digits_dataset(img_size=16)
    assert x_tr.shape[1:] == (1, 16, 16) and len(x_tr) + len(x_val) == 1797
    counts = torch.bincount(y_val, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 37  # ~20% of every class (174..183 images each)
    assert abs(torch.cat([x_tr, x_val]).mean().item()) < 1e-5


def test_short_run_loss_goes_down_and_writes_outputs(tmp_path):
    cfg = TrainConfig(epochs=3, limit_train=128, out_dir=str(tmp_path), **_QUICK)
    result = train(cfg)
    losses = [h["train_loss"] for h in result["history"]]
    assert losses[-1] < 0.8 * losses[0], losses
    assert result["history"][-1]["val_acc"] > 0.3  # 10 classes: chance is 0.1
    ckpt = torch.load(result["checkpoint"], weights_only=False)
    model = build_demo_model(16)
    model.load_state_dict(ckpt["model"])  # the checkpoint is a complete demo model
    assert ckpt["history"] == result["history"] and ckpt["config"]["epochs"] == 3
    if result["plot"] is not None:  # matplotlib present
        with open(result["plot"], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------
# Data parallel
# --------------------------------------------------------------------------------------------------

def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 1, 16, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    init_distributed("cpu")  # the code path `visattn train` takes under torchrun
    torch.manual_seed(0)
    model = build_demo_model(16, drop_path_rate=0.0)
    net = torch.nn.parallel.DistributedDataParallel(model)
    x, y = _batch()
    half = len(x) // world
    F.cross_entropy(net(x[rank * half:(rank + 1) * half]), y[rank * half:(rank + 1) * half]).backward()
    torch.save(_grads(model), os.path.join(out_dir, f"grads{rank}.pt"))
    # Then a whole (tiny) training run, data-parallel: it reuses the process group and ends it.
    result = train(TrainConfig(epochs=1, limit_train=64, out_dir=out_dir, plot=False, **_QUICK))
    torch.save(result, os.path.join(out_dir, f"result{rank}.pt"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_single_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)

    torch.manual_seed(0)
    model = build_demo_model(16, drop_path_rate=0.0)
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()  # one process, the union batch
    single = _grads(model)
    for rank in range(2):
        ddp = torch.load(tmp_path / f"grads{rank}.pt")
        assert ddp.keys() == single.keys()
        for name in single:
            torch.testing.assert_close(ddp[name], single[name], atol=1e-6, rtol=1e-4, msg=name)

    r0, r1 = (torch.load(tmp_path / f"result{r}.pt", weights_only=False) for r in range(2))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["history"][0]["val_acc"] == r1["history"][0]["val_acc"]  # validation is summed over ranks
    assert os.path.exists(r0["checkpoint"])
