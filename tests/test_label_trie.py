"""The requests that read the labels' token trie (pipeline.engine.label_trie): every node once."""

from collections import Counter

from pipeline.engine.label_trie import children, edges, node_reads, walks

EOT = 99
LABELS = [[1, EOT], [1, 2, EOT], [1, 2, 3, EOT], [4, 5, EOT], [4, 6, EOT], [7, EOT]]


def read_counts(reads):
    return Counter((node, t) for r in reads for node in r.steps for t in children(LABELS)[node] if t in r.want)


def test_walks_read_every_node_once_with_at_most_one_request_a_label():
    kids = children(LABELS)
    reads = walks(LABELS, cap=128)
    assert read_counts(reads) == Counter({(node, t): 1 for node, ts in kids.items() for t in ts})
    assert len(reads) <= len(LABELS) < len(kids)  # fewer requests than the node-per-request reads
    for r in reads:
        assert r.steps[0] == r.start and all(len(b) == len(a) + 1 for a, b in zip(r.steps, r.steps[1:]))
        if r.tokens:  # a walk takes the next token of its branch, kept in a spare slot
            assert [s + (t,) for s, t in zip(r.steps, r.tokens)][:-1] == list(r.steps[1:])
            assert r.spare in r.want and r.spare not in r.tokens
            assert not any(r.spare in kids[s] for s in r.steps)


def test_node_reads_are_one_request_a_node_and_split_past_the_cap():
    many = [[t, EOT] for t in range(300)]
    reads = node_reads(many, cap=128)
    assert [len(r.want) for r in reads if r.start == ()] == [128, 128, 44]
    assert all(not r.tokens for r in reads)
    assert sum(len(r.want) for r in reads) == 300 + 300  # the root's children, then each one's end
    assert len(walks(many, cap=128)) == len(reads)  # one-node branches need no walk


def test_edges_take_the_taken_tokens_value_from_the_spare_slot():
    reads = walks(LABELS, cap=128)
    walk = next(r for r in reads if len(r.steps) > 1)
    # per step: every asked id scores -(id); the taken token's slot holds the forcing value
    steps = [{t: (1e9 if t == walk.tokens[j] else -float(t)) for t in walk.want} for j in range(len(walk.steps))]
    for j, step in enumerate(steps):
        step[walk.spare] = -float(walk.tokens[j])
    got = edges([walk], [steps], children(LABELS))
    assert got and all(v == -float(token) for (_, token), v in got.items())
