"""Scoring throughput (issue 24's goal): ``score`` on documents reads at least 0.9x the tokens/s of
``evaluate`` on the same tokens and batch, timed alternated in this process (``bench_score.compare``:
the embedded model's held-out text cut into documents). A busy machine slows both sides alike; a
slow attempt (this shared machine's rates move by 20 % between runs) is retried, up to five."""
import bench_score


def test_score_reads_at_least_0_9_of_evaluate():
    model, docs, eos, protocol = bench_score.embedded_documents()
    # all 35 documents (11,000 tokens, about a second a side): with fewer documents than a few per
    # batch row, the rows cannot end together (a document stays in its row), and evaluate cuts the
    # stream anywhere
    ratios = []
    for _ in range(5):
        row = bench_score.compare(model, docs, eos, protocol, batch=8, rounds=3, rate=1e11)
        ratios.append(row["ratio"])
        if row["ratio"] >= 0.9:
            break
    assert max(ratios) >= 0.9, f"score / evaluate tokens/s: {ratios}"
