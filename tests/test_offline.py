"""Offline means no attempt: the demo's eval (``configs/eval/demo.yaml``: MMLU, IFEval, RAG, BFCL, roleplay judged
by a reward model) runs on a tiny model and a small demo world with every outbound connection made to fail
loudly, without the HF offline variables set, and tries none. (tests/test_serve.py runs its shared vLLM server
under the same guard.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import make_tiny_model_dir, tiny_config

REPO = Path(__file__).resolve().parents[1]

# Loaded as ``sitecustomize`` by every Python process started with ``guarded_env`` (vLLM's own processes too):
# its sockets refuse, and log to $MINITRON_NET_LOG, any address that is not this machine.
NET_GUARD = r'''
import json, os, socket

LOG = os.environ.get("MINITRON_NET_LOG")
LOOPBACK = ("localhost", "127.", "::1", "0.0.0.0")


def check(what, host):
    if not host or str(host).startswith(LOOPBACK):
        return
    with open(LOG, "a") as fh:
        fh.write(json.dumps([what, str(host), os.getpid()]) + "\n")
    raise OSError(f"network attempt blocked by the test: {what} {host}")


def guard(what, real, host_of):
    def wrapped(*args, **kw):
        check(what, host_of(*args, **kw))
        return real(*args, **kw)
    return wrapped


def address_host(sock, address, *rest):
    return address[0] if sock.family in (socket.AF_INET, socket.AF_INET6) else None


if LOG:
    socket.getaddrinfo = guard("getaddrinfo", socket.getaddrinfo, lambda host, *a, **k: host)
    socket.create_connection = guard("create_connection", socket.create_connection, lambda address, *a, **k: address[0])
    socket.socket.connect = guard("connect", socket.socket.connect, address_host)
    socket.socket.connect_ex = guard("connect_ex", socket.socket.connect_ex, address_host)
'''


def guarded_env(folder: Path) -> tuple[dict[str, str], Path]:
    """(environment, attempts log) for a process tree that must not reach the network: the guard as
    ``sitecustomize`` on PYTHONPATH, and none of the HF offline variables (the code must not need them)."""
    (folder / "netguard").mkdir(parents=True, exist_ok=True)
    (folder / "netguard" / "sitecustomize.py").write_text(NET_GUARD)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    log = folder / "net-attempts.jsonl"
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(folder / "netguard"), env.get("PYTHONPATH")])),
               MINITRON_NET_LOG=str(log))
    return env, log


def attempts(log: Path) -> list[str]:
    """The connection attempts logged so far: ``[what, host, pid]`` JSON lines."""
    return log.read_text().splitlines() if log.exists() else []


def guarded_cli(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """``minitron ARGS`` in a fresh guarded process: (the finished process, the connection attempts it logged)."""
    env, log = guarded_env(cwd)
    env.update(MINITRON_CACHE=str(cwd / "cache"), HF_HOME=str(cwd / "hf"), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "minitron.cli", *args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=600)
    return res, attempts(log)


def test_the_guard_sees_a_real_attempt(tmp_path):
    """Control: a hub model name, with the offline variables unset, does try huggingface.co (and is refused)."""
    res, tried = guarded_cli(["eval", "--model", "HuggingFaceTB/SmolLM2-135M-Instruct", "--suite", "mmlu",
                              "--out", str(tmp_path / "out")], tmp_path)
    assert res.returncode == 2 and "cannot load from the hub" in res.stderr, res.stderr[-2000:]
    assert tried and all("huggingface.co" in a for a in tried), tried


def test_demo_eval_tries_no_network(tmp_path, tiny_tokenizer, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    from minitron.punkt import ensure_punkt
    from minitron.world import WorldConfig, run as make_world

    demo = tmp_path / "runs" / "demo"  # the demo config's relative paths, under a scratch working directory
    make_world(WorldConfig(out=str(demo / "world"), n_entities=20, n_rag_entities=5, corpus_repeats=1, n_mc_test=10,
                           n_ifeval=4, n_rag=4, n_rag_train=4, n_bfcl=2, n_sft=10, n_errands=5, n_preference=5,
                           n_roleplay_eval=3, n_roleplay_pairs=5))
    model = make_tiny_model_dir(demo / "teacher", tiny_tokenizer)
    torch.manual_seed(3)
    rm = AutoModelForSequenceClassification.from_config(tiny_config(vocab_size=len(tiny_tokenizer), num_labels=1))
    rm.save_pretrained(demo / "aligned" / "rm")  # the demo's roleplay judge
    tiny_tokenizer.save_pretrained(demo / "aligned" / "rm")
    monkeypatch.setenv("MINITRON_CACHE", str(tmp_path / "cache"))  # where guarded_cli points the eval
    ensure_punkt(demo / "world" / "ifeval" / "input_data.jsonl", max_chars=300_000)  # small (the eval's: 2M chars)

    res, tried = guarded_cli(["eval", "--config", str(REPO / "configs" / "eval" / "demo.yaml"), "--model",
                              str(model), "--limit", "2"], tmp_path)
    assert tried == [], f"network attempts: {tried}\n{res.stderr[-3000:]}"
    assert res.returncode == 0, res.stderr[-3000:]
    tasks = json.loads((demo / "eval" / "results.json").read_text())["models"][0]["tasks"]
    assert set(tasks) == {"mmlu", "ifeval", "rag", "bfcl", "roleplay"}
    assert all(t["metrics"] for t in tasks.values()), {k: t["note"] for k, t in tasks.items()}
