"""The guessing environment, a text game without tools: the model guesses a whole number from 1 to 100 and
reads 'higher' or 'lower' after each wrong guess. The reward is for solving it in few turns: 1 for the
first guess, less by 0.1 per extra guess (at least 0.1), and 0 when it is not found. Its demonstrations play
a valid but slow game (random guesses among the numbers still possible), so that RL has turns to save."""

from __future__ import annotations

import hashlib
import random
import re

from grouprl.envs import Environment, Reply

LOW, HIGH = 1, 100
NUMBER = re.compile(r"-?\d+")


def secret_of(row: dict) -> int:
    """The number of a row: its `secret` column when that is a whole number in range, else one drawn from its
    prompt (uniform over the range whatever the task, where a task's answers would not be: a third of the
    word problems' are under 10, which a policy could learn in place of the game)."""
    try:
        secret = float(str(row.get("secret", "")).strip())  # 37, "37" or 37.0 (an int column with gaps)
        if secret.is_integer() and LOW <= secret <= HIGH:
            return int(secret)
    except ValueError:
        pass
    digest = hashlib.sha256(str(row.get("prompt", "")).encode()).digest()
    return LOW + int.from_bytes(digest[:4], "big") % (HIGH - LOW + 1)


class GuessNumber(Environment):
    def reset(self, row: dict) -> str:
        self.secret, self.guesses, self.solved = secret_of(row), 0, False
        return (f"I am thinking of a whole number from {LOW} to {HIGH}. Guess it: reply with one number, and I "
                "will say higher or lower.")

    def step(self, text: str) -> Reply:
        found = NUMBER.findall(text)
        if not found:
            return Reply(f"Reply with one whole number from {LOW} to {HIGH}.")
        self.guesses += 1
        guess = int(found[-1])
        if guess == self.secret:
            self.solved = True
            return Reply(done=True)
        return Reply("higher" if guess < self.secret else "lower")

    def reward(self) -> float:
        return max(1.0 - 0.1 * (self.guesses - 1), 0.1) if self.solved else 0.0

    def demonstrate(self, row: dict) -> list[dict]:
        """A game won by guessing at random (seeded by the row) among the numbers the replies still allow:
        never a wasted guess, but 7.5 of them on average where halving the range needs 5.8."""
        secret, low, high = secret_of(row), LOW, HIGH
        rng = random.Random(f"guess/{secret}/{row.get('prompt', '')}")
        messages: list[dict] = []
        while True:
            guess = rng.randint(low, high)
            messages.append({"role": "assistant", "content": str(guess)})
            if guess == secret:
                return messages
            low, high = (guess + 1, high) if guess < secret else (low, guess - 1)
            messages.append({"role": "user", "content": "higher" if guess < secret else "lower"})
