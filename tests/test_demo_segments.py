"""`exitflow demo`'s per-segment summary: where the policy's split went after each scenario boundary."""

import doctest

from consumers import demo


def result(seq, source, split, ns="p"):
    return {"seq": seq, "source": source, "layers": {"device": split}, "policy": {"ns": ns}}


def test_docstring_example():
    assert doctest.testmod(demo).failed == 0


def test_segments_follow_seq_order_and_a_recurring_source_is_two_segments():
    rs = [result(i, "sst2", 1) for i in range(200)] + [result(200 + i, "imdb", 2 if i < 320 else 1) for i in range(500)]
    rs += [result(700 + i, "sst2", 3, "p@1") for i in range(150)]
    out = demo.segments(list(reversed(rs)))       # arrival order does not matter, seq does
    assert [(s["source"], s["first_seq"], s["samples"]) for s in out] == [("sst2", 0, 200), ("imdb", 200, 500),
                                                                           ("sst2", 700, 150)]
    imdb = out[1]
    assert imdb["split_first"] == {"most": 2, "count": 300, "of": 300}
    assert imdb["split_after"] == {"most": 1, "count": 180, "of": 200}
    assert out[0]["epoch_at"] is None and out[2]["epoch_at"] == 700     # the epoch moved at its first sample
    assert all(s["split_after"]["of"] == 0 for s in (out[0], out[2]))


def test_a_gradual_mix_is_not_a_segment_and_results_without_seq_are_left_out():
    rs = [result(i, "imdb", 1) for i in range(150)]
    rs += [result(150 + i, "ag_news" if i % 2 else "imdb", 2) for i in range(100)]   # alternating: no run >= 100
    rs += [result(250 + i, "ag_news", 2, "p@1" if i >= 40 else "p") for i in range(120)]
    rs.append({"seq": None, "source": "x", "layers": {"device": 6}, "policy": {"ns": "p"}})
    out = demo.segments(rs)
    assert [(s["source"], s["samples"], s["epoch_at"]) for s in out] == [("imdb", 151, None), ("ag_news", 121, 290)]
