"""WaveGuard inside the frameworks people train with: Lightning, the HF Trainer, accelerate.

Installed by the ``frameworks`` extra (``pip install -e ".[test,frameworks]"``, as CI does);
each test is skipped when its framework is missing. Tiny models built from code or configs
(no downloads), CPU, a few steps. Oracles: the same training written as a plain loop with
WaveAdam (Lightning, accelerate), or the same Trainer run with WaveAdam and uninterrupted (HF),
compared bit for bit: a filter that saw stale gradients, or none, is off by far more.
"""

from __future__ import annotations

import pytest
import torch

from waveguard_optim import WaveAdam, wave_guard, wave_stats

STEPS = 7
BUFFER = 4  # STEPS > BUFFER: the filter runs for the last steps
HYPER = dict(lr=0.05, weight_decay=0.1)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    return [(torch.randn(6, 5, generator=generator), torch.randn(6, 2, generator=generator)) for _ in range(STEPS)]


def _waveadam(params) -> WaveAdam:
    return WaveAdam(params, decoupled_weight_decay=True, foreach=True, buffer_size=BUFFER, **HYPER)


def _wrapped_adamw(params) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(params, foreach=True, **HYPER)
    wave_guard(opt, buffer_size=BUFFER)
    return opt


OPTIMIZERS = {"wave_guard(AdamW)": _wrapped_adamw, "WaveAdam": _waveadam}


def _reference() -> list[torch.Tensor]:
    """A plain loop: WaveAdam on the batches in order."""
    model = _model()
    opt = _waveadam(model.parameters())
    for x, y in _batches():
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach() for p in model.parameters()]


def _assert_same(got, expected) -> None:
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)


# -- Lightning -------------------------------------------------------------------------------


def _lightning():
    try:
        import lightning.pytorch as pl
    except ImportError:
        pl = pytest.importorskip("pytorch_lightning")
    return pl


@pytest.mark.parametrize("automatic", [True, False], ids=["automatic", "manual"])
@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_lightning_trainer_fit_follows_the_plain_loop(make, automatic):
    """Lightning calls ``optimizer.step(closure=...)`` in both modes; the closure computes the gradients."""
    pl = _lightning()

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _model()
            self.automatic_optimization = automatic

        def training_step(self, batch, _):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            if automatic:
                return loss
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            self.stats = wave_stats(opt)  # a LightningOptimizer
            return None

        def configure_optimizers(self):
            return make(self.parameters())

        def train_dataloader(self):
            return torch.utils.data.DataLoader(_batches(), batch_size=None)  # each item is a batch

    module = Module()
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, enable_progress_bar=False, logger=False,
        enable_checkpointing=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module)
    _assert_same(module.net.parameters(), _reference())
    opt = trainer.optimizers[0]
    assert all(int(opt.state[p]["wave_count"]) == STEPS for p in module.net.parameters())
    assert wave_stats(opt)[0]["filtered"] == 1.0
    if not automatic:
        assert module.stats == wave_stats(opt)


# -- Hugging Face transformers Trainer -------------------------------------------------------


def _hf_run(tmp_path, make, *, max_steps, resume=None):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=40, n_positions=12)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    generator = torch.Generator().manual_seed(5)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 40, (32, 12), generator=generator)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4, use_cpu=True, report_to=[],
        save_strategy="steps", save_steps=3, logging_strategy="no", disable_tqdm=True, max_grad_norm=0.0, seed=0,
        dataloader_num_workers=0,
    )  # fmt: skip
    opt = make(model.parameters())
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    trainer.train(resume_from_checkpoint=resume)
    return trainer, [p.detach().clone() for p in model.parameters()]


def test_hf_trainer_wrapped_adamw_follows_waveadam(tmp_path):
    _, expected = _hf_run(tmp_path / "waveadam", _waveadam, max_steps=STEPS)
    trainer, got = _hf_run(tmp_path / "wrapped", _wrapped_adamw, max_steps=STEPS)
    _assert_same(got, expected)
    stats = wave_stats(trainer.optimizer)  # accelerate's AcceleratedOptimizer around the AdamW
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer" and stats[0]["filtered"] == 1.0


@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_hf_trainer_resume_is_bit_identical(tmp_path, make):
    """The Trainer saves the optimizer with torch.save and loads it back (weights_only)."""
    _, expected = _hf_run(tmp_path / "straight", make, max_steps=STEPS)
    _hf_run(tmp_path / "resumed", make, max_steps=STEPS)  # writes checkpoint-3 and checkpoint-6
    _, got = _hf_run(tmp_path / "resumed", make, max_steps=STEPS, resume=str(tmp_path / "resumed" / "checkpoint-6"))
    _assert_same(got, expected)


# -- accelerate ------------------------------------------------------------------------------


@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_accelerate_prepare_save_and_load_state_follow_the_plain_loop(tmp_path, make):
    accelerate = pytest.importorskip("accelerate")

    def setup():
        accelerator = accelerate.Accelerator(cpu=True)
        model = _model()
        return (accelerator, *accelerator.prepare(model, make(model.parameters())))

    accelerator, model, opt = setup()
    batches = _batches()
    for i, (x, y) in enumerate(batches):
        if i == 5:  # stop, and go on in fresh objects from the saved state
            accelerator.save_state(str(tmp_path / "state"))
            accelerator, model, opt = setup()
            accelerator.load_state(str(tmp_path / "state"))
        opt.zero_grad()
        accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
        opt.step()
    _assert_same(model.parameters(), _reference())
    assert type(opt).__name__ == "AcceleratedOptimizer" and wave_stats(opt)[0]["filtered"] == 1.0


def test_wave_guard_of_the_accelerated_optimizer_wraps_the_one_inside():
    """``wave_guard(accelerator.prepare(..., AdamW)[1])``: the AcceleratedOptimizer never ran
    Optimizer.__init__ (torch's hooks cannot attach to it); wave_guard attaches to its AdamW."""
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    model = _model()
    model, opt = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), foreach=True, **HYPER))
    handle = wave_guard(opt, buffer_size=BUFFER)
    assert handle.optimizer is opt.optimizer
    for x, y in _batches():
        opt.zero_grad()
        accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
        opt.step()
    _assert_same(model.parameters(), _reference())
