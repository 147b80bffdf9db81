"""
The bookkeeping of a train_cifar.py run, apart from its recipe: the run's directory (config.json,
log.jsonl, ckpt.pt and the one before it, ckpt-prev.pt), stop requests, and the clocks.

A file is replaced whole or not at all (write_atomically), so a kill at any point leaves a
checkpoint that loads; a damaged last checkpoint falls back to the one before it. The directory
is made at the first log row or checkpoint, so a run that cannot start leaves none.
"""

import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.distributed as dist

CHECKPOINT_FORMAT = 3
RUN_FILES = ("log.jsonl", "ckpt.pt", "ckpt-prev.pt")  # a config.json alone is no run yet
PROGRESS_EVERY_S = 10.0

def write_atomically(path, payload, previous=None):
    """Write text, or torch.save an object, via a temporary file and a rename; `previous` keeps
    the old file under that name once the new one is whole."""
    with open(path + ".tmp", "wb") as f:
        if isinstance(payload, str):
            f.write(payload.encode())
        else:
            torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename, should the machine go down
    if previous and os.path.exists(path):
        os.replace(path, previous)
    os.replace(path + ".tmp", path)

def new_state():
    """What a checkpoint holds besides weights, optimiser and generators: the step, the epoch's
    data order, its losses (read back up to `checked`) and its row waiting for evaluation."""
    return {"step": 0, "epochs_logged": 0, "saved_step": None, "order": None, "losses": None,
            "checked": 0, "row": None, "log": [], "elapsed_s": 0.0, "train_s": 0.0}

class RunFiles:
    """The run's directory; rank 0 writes it. A checkpoint holds no generator: a step's
    randomness is drawn from its seed (train_cifar.step_seed)."""

    def __init__(self, config, model, opt, rank, world):
        self.config, self.model, self.opt = config, model, opt
        self.rank, self.world, self.out = rank, world, config["out"]
        self.ckpt, self.previous = (os.path.join(self.out, name) for name in RUN_FILES[1:])

    def write(self, name, payload, previous=None):
        if not os.path.exists(os.path.join(self.out, "config.json")):
            os.makedirs(self.out, exist_ok=True)
            self.write_config()
        write_atomically(os.path.join(self.out, name), payload, previous)

    def write_config(self):
        text = json.dumps(self.config, indent=1) + "\n"
        write_atomically(os.path.join(self.out, "config.json"), text)

    def write_log(self, log):
        self.write("log.jsonl", "".join(json.dumps(row) + "\n" for row in log))

    def save(self, state):
        state["saved_step"] = state["step"]
        if self.rank == 0:
            checkpoint = {"format": CHECKPOINT_FORMAT, "model": self.model.state_dict(),
                          "opt": self.opt.state_dict(), "world": self.world, "state": state}
            self.write("ckpt.pt", checkpoint, previous=self.previous)

    def load(self):
        """The state of ckpt.pt, or of ckpt-prev.pt where ckpt.pt is missing or damaged (said in
        one line; a damaged file is kept as ckpt.pt.damaged); one error line if neither loads."""
        failures = [] if os.path.exists(self.ckpt) else [f"{self.ckpt} is missing"]
        for path in [p for p in (self.ckpt, self.previous) if os.path.exists(p)]:
            try:
                state = self.restore(path)
            except Exception as e:  # truncated, a key missing, a wrong shape
                first_line = (str(e).strip().splitlines() or [""])[0][:200]
                failures.append(f"{path} is damaged ({type(e).__name__}: {first_line})")
                continue
            if failures and self.rank == 0:
                print(f"warning: {failures[0]}; resuming from {path} at step {state['step']}",
                      file=sys.stderr)
                if os.path.exists(self.ckpt):  # kept, but never rotated in as the previous one
                    os.replace(self.ckpt, self.ckpt + ".damaged")
            return state
        if not os.path.exists(self.previous):
            failures.append(f"there is no {self.previous} to fall back to")
        sys.exit(f"error: {'; '.join(failures)}: the run cannot be resumed; start a new one "
                 f"with --out DIR")

    def restore(self, path):
        device = next(self.model.parameters()).device
        checkpoint = torch.load(path, map_location=device, weights_only=True)
        found = checkpoint.get("format", "0 or 1") if isinstance(checkpoint, dict) else "unknown"
        if found != CHECKPOINT_FORMAT:
            sys.exit(f"error: {path} is a checkpoint of format {found}, which this train_cifar.py "
                     f"does not read (it reads {CHECKPOINT_FORMAT}): continue it with the "
                     f"train_cifar.py that wrote it, or start a new run with --out DIR")
        if checkpoint["world"] != self.world:  # each process's share and randomness would change
            sys.exit(f"error: {path} was saved by {checkpoint['world']} processes; resume it with "
                     f"as many (torchrun --nproc_per_node N, or python for 1)")
        self.model.load_state_dict(checkpoint["model"])
        self.opt.load_state_dict(checkpoint["opt"])
        return checkpoint["state"]

class StopRequests:
    """SIGINT (Ctrl-C) and SIGTERM as requests to stop between steps, where weights, optimiser,
    BatchNorm statistics and step counter agree. One during evaluation, which changes none of
    them, or a second one stops at once. Under torchrun the processes learn of a request at the
    next loss read, so that all stop after the same step."""

    def __init__(self, world):
        self.count, self.world, self.evaluating = 0, world, False

    def __call__(self, signum, frame):
        self.count += 1
        if self.world == 1 and (self.evaluating or self.count > 1):
            raise KeyboardInterrupt
        if self.world == 1:
            print("\nstopping after this step (Ctrl-C again stops at once, without saving)",
                  file=sys.stderr, flush=True)

def read_losses(state, upto, asked, world):
    """Read the epoch's unchecked losses, up to its step `upto`, back (one sync) -> (the epoch's
    index and value of the first non-finite one, or None; whether any process `asked` to stop).
    Under torchrun the losses are averaged over the processes, so all decide alike."""
    start, state["checked"] = state["checked"], max(upto, state["checked"])
    asked = float(asked)
    if world > 1:
        both = torch.cat([state["losses"][start:upto], torch.tensor([asked]).to(state["losses"])])
        dist.all_reduce(both)
        state["losses"][start:upto], asked = both[:-1] / world, both[-1].item()
    values = state["losses"][start:upto].tolist()
    bad = [(start + k, value) for k, value in enumerate(values) if not math.isfinite(value)]
    return (bad[0] if bad else None), asked > 0

def clock(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{seconds:02d}s"

class Timing:
    """The session's clocks: each epoch's training time (evaluation excluded), a progress line at
    least every PROGRESS_EVERY_S seconds (time only, no loss read: the GPU waits for nothing),
    the run's time across resumes, and the time left."""

    def __init__(self, elapsed_before, steps_per_epoch, batch_size):
        self.elapsed_before, self.session = elapsed_before, time.perf_counter()
        self.steps, self.batch_size, self.epochs, self.begin = steps_per_epoch, batch_size, 0, None

    def start_epoch(self, i):
        self.begin = self.last = time.perf_counter()
        self.first = i

    def tick(self, epoch, i):
        """After the epoch's step i (from 1); nothing at its last step, whose row follows."""
        now = time.perf_counter()
        if now - self.last < PROGRESS_EVERY_S or i == self.steps:
            return
        self.last, per_step = now, (now - self.begin) / (i - self.first)
        print(f"epoch {epoch} step {i}/{self.steps}: {self.batch_size / per_step:.0f} img/s, "
              f"{clock(per_step * self.steps)} an epoch, {clock(per_step * (self.steps - i))} "
              f"left in this one", flush=True)

    def end_epoch(self):
        """-> (seconds of training in the epoch, its images per second)."""
        seconds, self.epochs = time.perf_counter() - self.begin, self.epochs + 1
        self.begin = None
        return seconds, (self.steps - self.first) * self.batch_size / seconds

    def elapsed(self):
        return self.elapsed_before + time.perf_counter() - self.session

    def eta(self, epochs_left):
        return (time.perf_counter() - self.session) / max(self.epochs, 1) * epochs_left

def git_commit():
    """The project's commit, marked -dirty if tracked files changed; None outside a clone."""
    here = os.path.dirname(os.path.abspath(__file__))
    command = ["git", "describe", "--always", "--dirty", "--exclude=*"]  # never a tag's name
    try:
        return subprocess.run(command, cwd=here, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
