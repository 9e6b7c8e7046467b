"""The per-expert prompt-prefix cache and the thread policy: real tiny GGUFs and adapters, no timings asserted."""
import pytest

from hublab.runtime.engine.runtime import Runtime
from hublab.runtime.engine.threads import RETRY_S, WINDOW, ThreadPolicy

# long enough that a reused prefix is most of the prompt
PREFIX = "the python model " * 3


def runtime(models_dir, **kw):
    kw.setdefault("profile", "host")
    kw.setdefault("threads", 1)
    return Runtime(models_dir=models_dir, keep_alive=-1, **kw)


def fresh(models_dir, expert, prompt, max_tokens=12):
    with runtime(models_dir) as rt:
        return rt.generate(expert, prompt, raw=True, max_tokens=max_tokens)


def test_a_prefix_computed_under_one_adapter_never_serves_another(tiny_models_dir):
    prompt = PREFIX + "and the rust model"
    beta_alone = fresh(tiny_models_dir, "beta", prompt)
    plain_alone = fresh(tiny_models_dir, "plain", prompt)
    with runtime(tiny_models_dir) as rt:
        alpha = rt.generate("alpha", prompt, raw=True, max_tokens=12)
        beta = rt.generate("beta", prompt, raw=True, max_tokens=12)     # the very prompt alpha just read
        plain = rt.generate("plain", prompt, raw=True, max_tokens=12)   # the bare base is a KV owner of its own
        assert alpha.cached_tokens == beta.cached_tokens == plain.cached_tokens == 0
        assert beta.text == beta_alone.text and plain.text == plain_alone.text
        assert len({alpha.text, beta.text, plain.text}) == 3
        base = rt._loaded["tiny"]
        assert {k[0] for k in base.states} == {"alpha", "beta"}   # plain's KV is live, the others are saved
        assert base.states[base.key("alpha")].tokens[:5].tolist() == base.llama.input_ids[:5].tolist()


def test_each_expert_gets_its_own_prefix_back_after_others_ran(tiny_models_dir):
    with runtime(tiny_models_dir) as rt:
        first = rt.generate("alpha", PREFIX + "and a list", raw=True, max_tokens=8)
        rt.generate("beta", PREFIX + "and a list", raw=True, max_tokens=8)
        rt.generate("gamma", "something else entirely", raw=True, max_tokens=8)
        again = rt.generate("alpha", PREFIX + "and a dict", raw=True, max_tokens=8)
        assert first.cached_tokens == 0
        assert 0 < again.cached_tokens < again.prompt_tokens
        assert again.cached_tokens >= len(rt._loaded["tiny"].llama.tokenize(PREFIX.encode())) - 2
        # the same answer as a runtime that never saw the others (the prefix is alpha's own)
        assert again.text == fresh(tiny_models_dir, "alpha", PREFIX + "and a dict", 8).text
        same = rt.generate("alpha", PREFIX + "and a dict", raw=True, max_tokens=8)
        assert same.cached_tokens == same.prompt_tokens - 1   # the last prompt token is read again for its logits


def test_unloading_an_adapter_drops_its_saved_prefix(tiny_models_dir):
    with runtime(tiny_models_dir) as rt:
        rt.generate("alpha", PREFIX, raw=True, max_tokens=4)
        rt.generate("beta", PREFIX, raw=True, max_tokens=4)
        base = rt._loaded["tiny"]
        assert any(k[0] == "alpha" for k in base.states)
        before = base.memory
        rt.unload("alpha")
        assert not any(k[0] == "alpha" for k in base.states) and base.memory < before
        again = rt.generate("alpha", PREFIX, raw=True, max_tokens=4)   # a new adapter object: starts cold
        assert again.cached_tokens == 0


def test_saved_prefixes_stay_within_their_cap_least_recent_first(tiny_models_dir):
    with runtime(tiny_models_dir) as rt:
        rt.generate("alpha", PREFIX, raw=True, max_tokens=4)
        base = rt._loaded["tiny"]
        rt.generate("beta", PREFIX, raw=True, max_tokens=4)
        one = base.states[base.key("alpha")].size
        base.state_cap = int(one * 2.5)
        for name in ("gamma", "plain", "alpha"):
            rt.generate(name, PREFIX, raw=True, max_tokens=4)
        assert sum(st.size for st in base.states.values()) <= int(one * 2.5)
        assert [k[0] for k in base.states] == ["gamma", None]   # beta, the least recent, went first; None: the base


def test_gemma_sliding_window_cache_reuses_and_matches_a_fresh_answer(gemma_gguf, tmp_path):
    from ggufs import write_lora_adapter, write_model_toml

    write_model_toml(tmp_path / "gemma.toml", "gemma", gguf_path=gemma_gguf, context_size=512)
    for name, seed in (("x", 11), ("y", 12)):
        adapter = write_lora_adapter(gemma_gguf, tmp_path / f"{name}.gguf", seed=seed, rank=4, scale=0.06,
                                     targets=("attn_q", "attn_v"))
        write_model_toml(tmp_path / f"{name}.toml", name, base="gemma", adapter=adapter)
    system = "You answer questions about France. " * 8
    with runtime(tmp_path) as rt:
        x1 = rt.generate("x", "The capital of France is", system_prompt=system, max_tokens=6)
        y1 = rt.generate("y", "The capital of France is", system_prompt=system, max_tokens=6)
        x2 = rt.generate("x", "The largest city of France is", system_prompt=system, max_tokens=6)
        assert x1.cached_tokens == y1.cached_tokens == 0 and x2.cached_tokens > 40
    with runtime(tmp_path) as rt:
        assert rt.generate("y", "The capital of France is", system_prompt=system, max_tokens=6).text == y1.text


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def run_windows(policy: ThreadPolicy, clock: Clock, speed: dict[int, float], windows: int) -> list[int]:
    """Feed `windows` windows of decode steps at speed[n] seconds per token; the counts each window ran with."""
    used = []
    for _ in range(windows):
        n = policy.choose()
        used.append(n)
        clock.t += speed[n] * WINDOW
        policy.observe(n, speed[n])
    return used


def test_thread_policy_fixed_counts_are_kept():
    p = ThreadPolicy(4, fixed=True)
    p.observe(4, 1.0)
    assert p.choose() == 4 and not p.seen
    assert ThreadPolicy(1).choose() == 1


def test_thread_policy_moves_off_a_busy_core_and_stays_while_it_is_faster():
    clock = Clock()
    p = ThreadPolicy(2, clock=clock)
    # one of two cores busy elsewhere: 2 threads drag (the numbers measured on this box: 11.4 vs 20.4 tok/s)
    used = run_windows(p, clock, {2: 1 / 11.4, 1: 1 / 20.4}, 12)
    assert used[:2] == [2, 1]            # the most threads first, then the neighbour
    assert used[2:] == [1] * 10          # 1 thread from then on: 12 windows take ~4 s, before a retry is due
    assert p.best() == 1


def test_thread_policy_retries_a_neighbour_after_a_while_and_finds_the_idle_board():
    clock = Clock()
    p = ThreadPolicy(2, clock=clock)
    run_windows(p, clock, {2: 1 / 11.4, 1: 1 / 20.4}, 4)
    clock.t += RETRY_S + 1               # the other process ended meanwhile
    used = run_windows(p, clock, {2: 1 / 38.0, 1: 1 / 20.4}, 4)
    # 2 is tried first and wins; 1, stale too, gets its one trial window; then 2 again
    assert used == [2, 1, 2, 2] and p.best() == 2


def test_thread_policy_retries_at_once_when_the_chosen_count_slows_down():
    clock = Clock()
    p = ThreadPolicy(4, clock=clock)
    used = run_windows(p, clock, {4: 0.02, 3: 0.03, 2: 0.04, 1: 0.08}, 3)
    assert used == [4, 3, 4] and p.best() == 4
    # two cores get busy: 4 threads now take 0.05 s a token; well under RETRY_S, the neighbour is tried again
    used = run_windows(p, clock, {4: 0.05, 3: 0.03, 2: 0.04, 1: 0.08}, 6)
    assert 3 in used[:4] and p.best() == 3 and used[-1] == 3


def test_paced_sets_threads_per_window_and_measures_steps_not_prefill():
    clock = Clock()
    p = ThreadPolicy(2, clock=clock)
    applied = []

    def tokens():
        clock.t += 5.0                   # prefill: long, not a decode step
        for i in range(3 * WINDOW + 1):
            yield i
            clock.t += 0.1 if applied[-1] == 2 else 0.05

    out = list(p.paced(tokens(), applied.append))
    assert out == list(range(3 * WINDOW + 1))
    assert applied == [2, 1]             # one window at 2, then 1 (faster) for the rest
    assert p.seen[2].per_token == pytest.approx(0.1) and p.seen[1].per_token == pytest.approx(0.05)


def test_runtime_threads_follow_the_policy_unless_set(tiny_models_dir):
    with runtime(tiny_models_dir, threads=0) as rt:
        r = rt.generate("tiny", "the python model", raw=True, max_tokens=4)
        base = rt._loaded["tiny"]
        assert not base.policy.fixed and base.policy.most == rt.threads
        assert 1 <= r.threads <= rt.threads
    with runtime(tiny_models_dir, threads=1) as rt:
        assert rt.generate("tiny", "the python model", raw=True, max_tokens=4).threads == 1
        assert rt._loaded["tiny"].policy.fixed
