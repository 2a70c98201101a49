# my_reward.py
def brief(prompts, completions, answer, **columns):
    return [1.0 if len(c) < 200 else 0.0 for c in completions]
