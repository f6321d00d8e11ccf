"""Writers in parallel through the mount while checkpoints and a rollback happen (issue 12).

Four (COWFS_CONCURRENCY_WRITERS) processes write whole files (written aside, then renamed into
place, as careful programs do: a checkpoint may fall between the open and the close), append to
a log, rename and delete,
each on its own names, for COWFS_CONCURRENCY_SECONDS (default 8); each logs every completed
operation with its sequence number, outcome and start/end times (CLOCK_MONOTONIC, shared by all
processes). Meanwhile the test takes checkpoints, and half way through rolls back to the turn
sealed before the writers started. Then:

- every turn's snapshot shows, per writer, exactly the state after a prefix of its log, and a
  prefix between what had completed when the checkpoint began and what had begun when it ended
  (a single point in time: nothing later, nothing missing, nothing torn);
- after the rollback, the state is that of the log's operations from the rollback on (an
  operation in flight during the rollback may fall on either side);
- the live tree at the end is every writer's log replayed: no lost or torn writes;
- no operation, checkpoint or rollback took longer than BOUND seconds (COWFS_CONCURRENCY_BOUND,
  default 5): the daemon never stalls;
- the store checks clean afterwards.
"""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run

SECONDS = float(os.environ.get("COWFS_CONCURRENCY_SECONDS", "8"))
WRITERS = int(os.environ.get("COWFS_CONCURRENCY_WRITERS", "4"))
BOUND = float(os.environ.get("COWFS_CONCURRENCY_BOUND", "5"))
NAMES = 6

WRITER = r'''
import errno, json, os, random, sys, time
root, me, log_path, stop, seed = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
rng = random.Random(seed)
names = [f"w{me}-f{k}" for k in range(%(names)d)]
with open(log_path, "w") as log:
    seq = 0
    while not os.path.exists(stop):
        r = rng.random()
        start = time.monotonic()
        outcome = "ok"
        try:
            if r < 0.35:
                op = ["write", rng.choice(names), rng.randrange(1, 200_000)]
                data = (b"%%d:%%d|" %% (me, seq)) * (op[2] // 8 + 1)
                # Whole, then renamed into place: a checkpoint may fall between open and close.
                # (A rollback in between takes the new file away: ENOENT, nothing written.)
                with open(os.path.join(root, f"w{me}-tmp"), "wb") as f:
                    f.write(data[:op[2]])
                os.rename(os.path.join(root, f"w{me}-tmp"), os.path.join(root, op[1]))
            elif r < 0.65:
                op = ["append", f"w{me}-log"]
                with open(os.path.join(root, op[1]), "ab") as f:
                    f.write(b"%%-60s\n" %% (b"writer %%d op %%d" %% (me, seq)))
            elif r < 0.85:
                op = ["rename", rng.choice(names), rng.choice(names)]
                os.rename(os.path.join(root, op[1]), os.path.join(root, op[2]))
            else:
                op = ["delete", rng.choice(names)]
                os.unlink(os.path.join(root, op[1]))
        except FileNotFoundError:
            outcome = "ENOENT"
        end = time.monotonic()
        log.write(json.dumps({"seq": seq, "op": op, "outcome": outcome, "start": start, "end": end}) + "\n")
        log.flush()
        seq += 1
''' % {"names": NAMES}


def write_data(writer: int, seq: int, size: int) -> bytes:
    return ((b"%d:%d|" % (writer, seq)) * (size // 8 + 1))[:size]


def append_data(writer: int, seq: int) -> bytes:
    return b"%-60s\n" % (b"writer %d op %d" % (writer, seq))


def replay(writer: int, ops: list[dict]) -> list[dict | None]:
    """The writer's files after each prefix of *ops* from nothing: states[L] after L operations;
    None from the first operation whose outcome the state contradicts."""
    state: dict[str, bytes] = {}
    states: list[dict | None] = [dict(state)]
    for entry in ops:
        op, ok = entry["op"], entry["outcome"] == "ok"
        if op[0] == "write" and not ok:
            pass                                # a rollback took its new file away
        elif op[0] == "write":
            state[op[1]] = write_data(writer, entry["seq"], op[2])
        elif op[0] == "append":
            state[op[1]] = state.get(op[1], b"") + append_data(writer, entry["seq"])
        elif (op[1] in state) != ok:
            break                               # the outcome says the file was (not) there
        elif ok and op[0] == "rename" and op[1] != op[2]:
            state[op[2]] = state.pop(op[1])
        elif ok and op[0] == "delete":
            del state[op[1]]
        states.append(dict(state))
    return states + [None] * (len(ops) + 1 - len(states))


def files_of(root, writer: int) -> dict[str, bytes]:
    out = {}
    for name in os.listdir(root):
        if name.startswith(f"w{writer}-") and name != f"w{writer}-tmp":   # a write in flight
            with open(os.path.join(root, name), "rb") as f:
                out[name] = f.read()
    return out


def matching_prefix(states, ops, seen: dict, begun: float, ended: float) -> int | None:
    """The L with states[L] == seen, L between the operations completed before *begun* and those
    started before *ended*; None if there is none."""
    lo = sum(1 for e in ops if e["end"] < begun)
    hi = sum(1 for e in ops if e["start"] < ended)
    for length in range(lo, hi + 1):
        if states[length] is not None and states[length] == seen:
            return length
    return None


@pytest.mark.parametrize("backing", ["xfs"], indirect=True)
def test_parallel_writers_checkpoints_and_a_rollback(workspace, backing):
    ws, p = workspace, workspace.path
    (p / "base").write_text("base\n")
    ws.mount()
    base_turn = int(ws.cli("checkpoint", "-m", "before the writers").stdout.strip().removeprefix("turn-"))
    stop = backing / "stop"
    logs = [backing / f"writer-{i}.jsonl" for i in range(WRITERS)]
    seed = int(os.environ.get("COWFS_CONCURRENCY_SEED", str(random.randrange(1 << 30))))
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(p), str(i), str(logs[i]), str(stop),
                                 str(seed + i)]) for i in range(WRITERS)]
    checkpoints, rollback, latencies = [], None, []
    try:
        rng = random.Random(seed)
        deadline = time.monotonic() + SECONDS
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(0.1, 0.4))
            begun = time.monotonic()
            if rollback is None and begun > deadline - SECONDS / 2:
                out = json.loads(run([*ws.cowfs_cmd, "log", "-C", p, "--json"]).stdout)
                reply = ws.cli("rollback", str(base_turn)).stdout
                ended = time.monotonic()
                pending = int(reply.split("sealed pending changes as turn-")[1].split()[0])
                rollback = {"begun": begun, "ended": ended, "pending": pending,
                            "turn": int(reply.rsplit("turn-", 1)[1].rstrip(")\n"))}
                assert out[-1]["sealed"] is None
            else:
                turn = int(ws.cli("checkpoint").stdout.strip().removeprefix("turn-"))
                ended = time.monotonic()
                checkpoints.append((turn, begun, ended))
            latencies.append(ended - begun)
    finally:
        stop.touch()
        for w in writers:
            w.wait(timeout=60)
    assert all(w.returncode == 0 for w in writers)
    assert rollback is not None and len(checkpoints) >= 4
    begun = time.monotonic()
    final = int(ws.cli("checkpoint").stdout.strip().removeprefix("turn-"))
    checkpoints.append((final, begun, time.monotonic()))

    logs = [[json.loads(line) for line in path.read_text().splitlines()] for path in logs]
    latencies += [e["end"] - e["start"] for log in logs for e in log]
    print(f"\nseed {seed}: {WRITERS} writers, {sum(map(len, logs))} operations, {len(checkpoints)} checkpoints, "
          f"1 rollback in {SECONDS:g} s; slowest operation/checkpoint/rollback {max(latencies):.3f} s")
    assert max(latencies) < BOUND, f"something waited {max(latencies):.1f} s"

    keep = os.environ.get("COWFS_CONCURRENCY_KEEP")
    if keep:
        import shutil
        shutil.rmtree(keep, ignore_errors=True)
        shutil.copytree(backing, keep, ignore=shutil.ignore_patterns(".cowfs", ".snapshots"))
        (Path(keep) / "meta.json").write_text(json.dumps({"checkpoints": checkpoints, "rollback": rollback}))
        for t, _, _ in checkpoints + [(rollback["pending"], 0, 0), (rollback["turn"], 0, 0)]:
            shutil.copytree(ws.snapshots / f"turn-{t}", Path(keep) / f"turn-{t}")
    for writer, ops in enumerate(logs):
        check_writer(ws, writer, ops, checkpoints, rollback)
    ws.umount()
    out = run([*ws.cowfs_cmd, "fsck", p], check=False)
    assert out.returncode == 0, out.stdout


def check_writer(ws, writer, ops, checkpoints, rollback) -> None:
    for e in ops:       # only a rollback can take a writer's new file away before its rename
        assert e["op"][0] != "write" or e["outcome"] == "ok" or \
            e["end"] > rollback["begun"] and e["start"] < rollback["ended"], e
    before = [e for e in ops if e["end"] < rollback["ended"]]
    states = replay(writer, ops)
    for turn, begun, ended in checkpoints:
        if ended < rollback["begun"]:
            seen = files_of(ws.snapshots / f"turn-{turn}", writer)
            assert matching_prefix(states, ops, seen, begun, ended) is not None, (writer, turn)
    # The turn sealed by the rollback as pending: the state when the rollback began.
    seen = files_of(ws.snapshots / f"turn-{rollback['pending']}", writer)
    assert matching_prefix(states, before, seen, rollback["begun"], rollback["ended"]) is not None
    assert files_of(ws.snapshots / f"turn-{rollback['turn']}", writer) == {}   # back to the base
    # After the rollback: the log from some operation in flight during it, replayed from nothing.
    first = min((i for i, e in enumerate(ops) if e["end"] > rollback["begun"]), default=len(ops))
    last = min((i for i, e in enumerate(ops) if e["start"] > rollback["ended"]), default=len(ops))
    live = files_of(ws.path, writer)
    for start in range(first, last + 1):
        after = ops[start:]
        states = replay(writer, after)
        if states[-1] != live:
            continue
        if all(matching_prefix(states, after, files_of(ws.snapshots / f"turn-{turn}", writer),
                               begun, ended) is not None
               for turn, begun, ended in checkpoints if begun > rollback["ended"]):
            return
    pytest.fail(f"writer {writer}: no replay of its log after the rollback (from operation "
                f"{first} to {last}) gives the live tree and every later snapshot; live "
                f"{_sizes(live)}, replayed from {first}: {_sizes(replay(writer, ops[first:])[-1])}"
                + "".join(f"; from {i}: " + _contradiction(writer, ops[i:]) for i in range(first, last + 1)))


def _contradiction(writer, ops) -> str:
    states = replay(writer, ops)
    bad = next((i for i, s in enumerate(states) if s is None), None)
    if bad is None:
        return "consistent"
    return f"op {ops[bad - 1]['seq']} {ops[bad - 1]['op']} {ops[bad - 1]['outcome']} on {_sizes(states[bad - 1])}"


def _sizes(files: dict | None) -> dict | None:
    return None if files is None else {name: len(data) for name, data in sorted(files.items())}


APPENDER = r'''
import json, os, random, sys, time
root, me, log_path, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
rng = random.Random(me)
with open(log_path, "w") as log:
    seq = 0
    while not os.path.exists(stop):
        start = time.monotonic()
        with open(os.path.join(root, f"a{me}-{rng.choice('xy')}"), "ab") as f:
            f.write(b"%d\n" % seq)
        log.write(json.dumps([seq, start, time.monotonic()]) + "\n")
        log.flush()
        seq += 1
'''


def appended(root, writer: int) -> list[int]:
    seqs = []
    for name in ("x", "y"):
        try:
            with open(os.path.join(root, f"a{writer}-{name}"), "rb") as f:
                seqs += [int(line) for line in f.read().split()]
        except FileNotFoundError:
            pass
    return sorted(seqs)


@pytest.mark.parametrize("backing", ["xfs"], indirect=True)
def test_no_append_lands_in_a_file_a_rollback_took_away(workspace, backing):
    """Writers append by name to two files each while rollbacks take both files away, over and
    over: each append after a rollback lands in the tree, never in the old file the kernel still
    had a dentry of (found by the test above: an append after the rollback, through the stale
    dentry, went into the store under no name). So between two rollbacks every writer's appends
    in the tree are one run of consecutive operations, with none missing."""
    ws, p = workspace, workspace.path
    ws.mount()
    base = int(ws.cli("checkpoint").stdout.strip().removeprefix("turn-"))
    stop, logs = backing / "stop", [backing / f"appender-{i}.jsonl" for i in range(WRITERS)]
    writers = [subprocess.Popen([sys.executable, "-c", APPENDER, str(p), str(i), str(logs[i]), str(stop)])
               for i in range(WRITERS)]
    rollbacks = []
    try:
        for _ in range(int(os.environ.get("COWFS_CONCURRENCY_ROLLBACKS", "12"))):
            for i in range(300):        # more for the rollback to undo: a longer invalidation
                (p / f"bulk-{i}").write_bytes(b"")
            begun = time.monotonic()
            reply = ws.cli("rollback", str(base)).stdout
            rollbacks.append((begun, time.monotonic(),
                              int(reply.split("sealed pending changes as turn-")[1].split()[0])))
    finally:
        stop.touch()
        for w in writers:
            w.wait(timeout=60)
    assert all(w.returncode == 0 for w in writers)
    for writer, path in enumerate(logs):
        ops = [json.loads(line) for line in path.read_text().splitlines()]
        periods = [(rollbacks[i - 1][1] if i else 0, rollbacks[i][0], ws.snapshots / f"turn-{rollbacks[i][2]}")
                   for i in range(1, len(rollbacks))] + [(rollbacks[-1][1], float("inf"), p)]
        for after, before, tree_root in periods:
            seen = appended(tree_root, writer)
            assert seen == list(range(seen[0], seen[-1] + 1)) if seen else True, (writer, tree_root)
            surely = [seq for seq, start, end in ops if start > after and end < before]
            assert set(surely) <= set(seen), (writer, tree_root, sorted(set(surely) - set(seen))[:5])
