"""Gateway agents run in threads, each stopped at the end of its test if it is still running."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from careflow.edge.agent import AgentConfig, EdgeAgent


class AgentThread:
    def __init__(self, config: AgentConfig) -> None:
        self.agent = EdgeAgent(config)
        self.thread = threading.Thread(target=self.agent.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.agent.stop()
        self.thread.join(timeout=15)
        assert not self.thread.is_alive()


@pytest.fixture
def run_agent() -> Iterator[Callable[[AgentConfig], AgentThread]]:
    """Start an agent with this config in a thread; the test's end stops it if it still runs."""
    started: list[AgentThread] = []

    def start(agent_config: AgentConfig) -> AgentThread:
        runner = AgentThread(agent_config)
        started.append(runner)
        return runner

    yield start
    for runner in started:
        if runner.thread.is_alive():
            runner.stop()


def spool(agent_dir: Path, name: str, readings: list[dict[str, object]]) -> None:
    """Drop ``readings`` into the agent's spool directory as one file, as a sensor bridge does."""
    target = agent_dir / "spool"
    target.mkdir(parents=True, exist_ok=True)
    tmp = target / f"{name}.tmp"
    tmp.write_text("\n".join(json.dumps(r) for r in readings) + "\n")
    tmp.rename(target / f"{name}.jsonl")
