"""Nothing resolves or connects unless the recipe asks for a network service (issue 14, item 3).

- A default single-process run (wandb offline, local jsonl data) makes no name lookup and connects only
  to Unix sockets (wandb's local service): an audit hook (`sys.addaudithook`) in the child records every
  `socket.getaddrinfo` / `gethostbyname` / `gethostbyaddr` / `connect` / `bind`.
- A two-process single-node launch listens on loopback only (every listening TCP socket of the launcher's
  process tree, read from /proc) and its Python code asks DNS for nothing (the same hook in every
  process, through sitecustomize). C++ lookups are invisible to the hook: under strace the same launch
  sends no DNS query (the stores are files in a private directory, gloo uses `lo`).
"""
import ipaddress
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import yaml

from tests.foundation_utils import ROOT, tiny_recipe_dict
from tests.zero_utils import recipe_dict

HOOK = r'''
import json, os, socket, sys
_log = os.environ["NET_AUDIT_LOG"]
def _hook(event, args):
    if event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr",
                 "socket.getnameinfo", "socket.connect", "socket.bind"):
        if event in ("socket.connect", "socket.bind"):
            sock, addr = args[0], args[1]
            if sock.family == socket.AF_UNIX:
                return
            args = [addr[0], addr[1]]
        with open(_log, "a") as f:
            f.write(json.dumps({"event": event, "args": [str(a) for a in args], "pid": os.getpid()}) + "\n")
sys.addaudithook(_hook)
'''


def _events(path) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _assert_local(events):
    for e in events:
        if e["event"] in ("socket.connect", "socket.bind", "socket.getaddrinfo"):
            assert _is_loopback(e["args"][0]), e          # loopback only (numeric or 'localhost' from /etc/hosts)
        else:
            raise AssertionError(f"name lookup: {e}")      # gethostbyname / gethostbyaddr / getfqdn ...


def test_default_run_resolves_and_connects_nothing(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n" * 8}) + "\n" for i in range(400)))
    d = tiny_recipe_dict(str(tmp_path / "cache"), steps=2, val_every=0)
    d["tokenizer"] = {"vocab_size": 300, "train_bytes": 200_000}
    d["data"] = {"source": "jsonl", "paths": [str(data)], "cache_dir": str(tmp_path / "cache"), "val_fraction": 0.1}
    d["logging"] = {"wandb": "offline", "progress": "off"}          # the default logging mode
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(d))
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(HOOK)
    log = tmp_path / "net.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(PYTHONPATH=f"{tmp_path / 'hook'}{os.pathsep}{ROOT}", NET_AUDIT_LOG=str(log), WANDB_SILENT="true")
    res = subprocess.run([sys.executable, "-m", "lctrain.cli", "train", str(recipe), "--run-dir", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert os.path.isdir(tmp_path / "run" / "wandb")                 # wandb did run (offline)
    _assert_local(_events(log))


def _tree(root: int) -> set[int]:
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parents[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, grew = {root}, True
    while grew:
        new = {p for p, pp in parents.items() if pp in tree} - tree
        tree |= new
        grew = bool(new)
    return tree


def _listening(pids: set[int]) -> set[str]:
    """Local addresses of the LISTEN-state TCP sockets the processes `pids` hold."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            pass
    out = set()
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] != "0A" or cols[9] not in inodes:
                continue
            hexaddr = cols[1].split(":")[0]
            raw = bytes.fromhex(hexaddr)
            if v6:   # four little-endian 32-bit words
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                out.add(str(ipaddress.IPv6Address(raw)))
            else:
                out.add(str(ipaddress.IPv4Address(raw[::-1])))
    return out


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_single_node_launch_listens_on_loopback_only(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(steps=4)))
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(HOOK)
    log = tmp_path / "net.jsonl"
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'hook'}{os.pathsep}{ROOT}", "NET_AUDIT_LOG": str(log)}
    env.pop("GLOO_SOCKET_IFNAME", None)
    cmd = ["bash", os.path.join(ROOT, "launch", "single_node.sh"), str(recipe), "--nproc-per-node", "2",
           "--run-dir", str(tmp_path / "run")]
    trace = tmp_path / "strace.txt"
    if _strace_works():          # C++ too (TCPStore, gloo): every connect / bind of every process
        cmd = ["strace", "-f", "-e", "trace=connect,bind", "-o", str(trace)] + cmd
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    seen, stop = set(), threading.Event()

    def poll():
        while not stop.is_set():
            seen.update(_listening(_tree(proc.pid)))
            time.sleep(0.05)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        stop.set()
        t.join()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert '"status": "completed"' in out
    assert seen, "no listening socket observed (the rendezvous store listens for the whole run)"
    assert all(ipaddress.ip_address(a).is_loopback or a.startswith("::ffff:127.") for a in seen), seen
    _assert_local(_events(log))
    if trace.exists():
        calls = [line for line in trace.read_text().splitlines() if "sa_family=AF_INET" in line]
        assert calls, "strace saw no TCP socket (gloo connects its ranks over loopback)"
        assert not [c for c in calls if "htons(53)" in c], "a DNS query"
        loopback = ("127.0.0.1", '"::1"')         # IPv4 or IPv6 loopback
        assert all(any(a in c for a in loopback) for c in calls), [c for c in calls if not any(a in c for a in loopback)][:3]


def _strace_works() -> bool:
    import shutil
    if not shutil.which("strace"):
        return False
    try:
        return subprocess.run(["strace", "-f", "-o", os.devnull, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
