import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_leaf_flower_learns_and_prints_its_progress():
    out = subprocess.run([sys.executable, str(EXAMPLES / "leaf_flower.py"), "--epochs", "120"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    losses = [float(line.split("loss")[1].split()[0]) for line in out.splitlines() if line.startswith("epoch")]
    assert len(losses) == 5 and losses[-1] < losses[0] / 5  # the loss falls
    accuracy = float(out.split("test accuracy on 200 new objects:")[1].split("%")[0])
    assert accuracy >= 90.0
    assert "-> leaf" in out and "-> flower" in out
