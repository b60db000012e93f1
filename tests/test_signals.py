"""Signals beyond qrels: sampled softmax with log-Q correction, teacher KL, target distillation, Matryoshka."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ingest_args, one_step, write_synthetic_sources
from esep_jax.cli import main
from esep_jax.data.signals import BatchRows, SampledCandidates, TeacherCandidates
from esep_jax.data.candidates import Candidates
from esep_jax.objectives.distillation import distillation_loss
from esep_jax.objectives.full_corpus import full_corpus_softmax_loss
from esep_jax.objectives.listwise import listwise_distillation_loss
from esep_jax.objectives.matryoshka import prefix_corpus, prefix_queries
from esep_jax.objectives.sampled import candidate_softmax_loss
from esep_jax.objectives.teacher import teacher_kl_loss

FAST = ["--config.optim.weight_decay=1e-4", "--config.train.num_steps=60", "--config.train.eval_every=20", "--config.train.checkpoint_every=20",
        "--config.train.batch_size=32", "--config.train.log_every=10", "--config.optim.warmup_steps=5",
        "--config.train.patience=100", "--no-progress", "--config.optim.learning_rate=1e-2", "--config.optim.weight_decay=1e-4",
        "--config.loss.recovery_weight=0.1"]


def _problem(seed=0, batch=6, docs=300, dim=8, positives=3):
    rng = np.random.default_rng(seed)
    corpus = rng.normal(size=(docs, dim)).astype(np.float32)
    queries = rng.normal(size=(batch, dim)).astype(np.float32)
    ids = np.stack([rng.choice(docs, positives, replace=False) for _ in range(batch)]).astype(np.int32)
    ids[0, -1] = -1  # padding
    weights = rng.integers(1, 3, size=ids.shape).astype(np.float32)
    return corpus, queries, ids, weights


def test_candidate_softmax_over_every_document_is_the_full_corpus_loss():
    corpus, queries, ids, weights = _problem()
    batch, docs = len(queries), len(corpus)
    all_ids = np.concatenate([ids, np.tile(np.arange(docs, dtype=np.int32), (batch, 1))], axis=1)
    sampler = SampledCandidates(corpus, np.ones(docs, bool), hard_negatives=None, random_negatives=0, seed=0)
    # The "fixed" slots here are every document after the positives; duplicates must be masked once each.
    fields = sampler.finish(BatchRows(0, 0, np.arange(batch), all_ids, np.concatenate(
        [weights, np.zeros((batch, docs), np.float32)], axis=1)))
    assert (fields["candidate_mask"].sum(axis=1) == docs).all()
    sampled = candidate_softmax_loss(queries, fields["candidate_vectors"], fields["candidate_bias"],
                                     fields["candidate_mask"], fields["candidate_targets"])
    full = full_corpus_softmax_loss(queries, corpus, ids, weights, 1.0)
    np.testing.assert_allclose(sampled, full, rtol=1e-5)


def test_log_q_correction_makes_the_sampled_loss_estimate_the_full_one():
    corpus, queries, ids, weights = _problem(docs=2000, dim=8)
    queries *= 0.5
    full = np.asarray(full_corpus_softmax_loss(queries, corpus, ids, weights, 1.0))
    sampler = SampledCandidates(corpus, np.ones(len(corpus), bool), hard_negatives=None, random_negatives=256,
                                seed=0)
    estimates, uncorrected = [], []
    for step in range(40):
        fields = sampler.finish(BatchRows(step, 0, np.arange(len(queries)), ids, weights))
        args = (queries, fields["candidate_vectors"], fields["candidate_bias"], fields["candidate_mask"],
                fields["candidate_targets"])
        estimates.append(candidate_softmax_loss(*args))
        uncorrected.append(candidate_softmax_loss(*args[:2], np.zeros_like(args[2]), *args[3:]))
    # exp(loss) = Ẑ / exp(positive score): the corrected normaliser estimate is unbiased (its log is not).
    np.testing.assert_allclose(np.mean(np.exp(estimates), axis=0), np.exp(full), rtol=0.03)
    np.testing.assert_allclose(np.mean(estimates, axis=0), full, atol=0.15)
    assert (np.mean(uncorrected, axis=0) < full - 1.0).all()  # without it the normaliser is far too small


def test_sampled_slots_hold_positives_hard_negatives_and_contrasted_random_draws():
    corpus, queries, ids, weights = _problem(docs=50)
    contrasted = np.zeros(50, bool)
    contrasted[:30] = True
    contrasted[ids[ids >= 0]] = True
    hard = Candidates(np.arange(6), np.tile(np.array([[ids[1, 0], 40, 41, -1]], np.int32), (6, 1)),
                      np.zeros((6, 4), np.float32))
    contrasted[40] = True  # 41 stays outside the contrasted set: dropped
    sampler = SampledCandidates(corpus, contrasted, hard_negatives=hard, random_negatives=16, seed=3)
    fields = sampler.finish(BatchRows(5, 0, np.arange(6), ids, weights))
    mask, targets = fields["candidate_mask"], fields["candidate_targets"]
    positives = ids.shape[1]
    assert (mask[:, :positives] == (ids >= 0)).all()
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
    assert not mask[1, positives]  # the hard negative that is a positive of query 1 is a duplicate
    assert mask[0, positives + 1] and not mask[0, positives + 2]  # row 40 kept, 41 (not contrasted) dropped
    drawn = fields["candidate_vectors"][:, positives + 4:]
    assert all(any(np.allclose(v, corpus[r]) for r in np.flatnonzero(contrasted)) for v in drawn.reshape(-1, 8))
    again = sampler.finish(BatchRows(5, 0, np.arange(6), ids, weights))
    for name in fields:  # step-addressed: the same step gives the same draws
        np.testing.assert_array_equal(fields[name], again[name])


def test_teacher_kl_is_zero_when_the_head_agrees_and_positive_otherwise():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(4, 5, 8)).astype(np.float32)
    queries = rng.normal(size=(4, 8)).astype(np.float32)
    mask = np.ones((4, 5), bool)
    mask[1, 3:] = False
    mask[2] = False  # no candidates: contributes nothing
    agreeing = np.einsum("bd,bcd->bc", queries, vectors) * 0.5
    kl = np.asarray(teacher_kl_loss(queries, vectors, agreeing, mask, 0.5))
    np.testing.assert_allclose(kl, 0.0, atol=1e-5)
    kl = np.asarray(teacher_kl_loss(queries, vectors, rng.normal(size=(4, 5)).astype(np.float32), mask, 0.1))
    assert (kl[[0, 1, 3]] > 1e-3).all() and kl[2] == 0.0
    grad = jax.grad(lambda q: teacher_kl_loss(q, vectors, agreeing * 3, mask, 0.5).sum())(queries)
    assert np.isfinite(np.asarray(grad)).all() and not np.asarray(grad[2]).any()


def test_teacher_candidates_gather_vectors_and_pad_unknown_queries():
    corpus = np.arange(20, dtype=np.float32).reshape(10, 2)
    teacher = Candidates(np.array([4, 7]), np.array([[3, 1, -1], [0, 2, 5]]), np.array([[2., 1., 0.], [3., 2., 1.]]))
    fields = TeacherCandidates(corpus, teacher).finish(BatchRows(0, 0, np.array([7, 9, 4]), None, None))
    np.testing.assert_array_equal(fields["teacher_mask"], [[1, 1, 1], [0, 0, 0], [1, 1, 0]])
    np.testing.assert_array_equal(fields["teacher_vectors"][0], corpus[[0, 2, 5]])
    np.testing.assert_array_equal(fields["teacher_scores"][2], [2., 1., 0.])


def test_distillation_losses():
    v = jnp.array([[3.0, 4.0], [1.0, 0.0]])
    t = jnp.array([[3.0, 0.0], [-2.0, 0.0]])
    np.testing.assert_allclose(distillation_loss(v, t, "mse"), [16.0, 9.0])
    np.testing.assert_allclose(distillation_loss(v, t, "cosine"), [1 - 0.6, 2.0], rtol=1e-6)


def test_prefix_blocks_score_against_truncated_renormalised_indexes():
    rng = np.random.default_rng(1)
    q, c = rng.normal(size=(3, 16)).astype(np.float32), rng.normal(size=(7, 16)).astype(np.float32)
    extended = prefix_corpus(c, [4, 8, 32])  # 32 >= the full dim is dropped; the full dim is always last
    assert extended.shape == (7, 4 + 8 + 16)
    stacked = np.asarray(prefix_queries(jnp.asarray(q), [4, 8, 32]))
    assert stacked.shape == (3, 3, 28)
    for block, k in zip(stacked, (4, 8, 16)):
        truncated = c[:, :k] if k == 16 else c[:, :k] / np.linalg.norm(c[:, :k], axis=1, keepdims=True)
        np.testing.assert_allclose(block @ extended.T, q[:, :k] @ truncated.T, rtol=1e-5, atol=1e-6)


def _train(data, workdir, *overrides):
    assert main(["train", "--data", data, "--workdir", str(workdir), *FAST, *overrides]) == 0
    return json.loads((workdir / "summary.json").read_text())


def test_sampled_softmax_with_mined_negatives_trains(synthetic_dataset, tmp_path):
    data = tmp_path / "data"
    import shutil
    shutil.copytree(synthetic_dataset, data)
    assert main(["mine", "--data", str(data), "--split", "train", "--name", "hard", "--k", "8", "--skip", "2"]) == 0
    summary = _train(str(data), tmp_path / "run", "--config.loss.kind=sampled",
                     "--config.loss.hard_negatives=hard", "--config.loss.random_negatives=32")
    assert summary["best_dev"]["ndcg@10"] > summary["base_dev"]["ndcg@10"] + 0.01
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in records if r["kind"] == "train")


def test_teacher_distillation_alone_learns_from_a_good_teacher(synthetic_dataset, tmp_path):
    """A teacher that scores the true positives high over random candidates teaches the head without qrels."""
    data = tmp_path / "data"
    import shutil
    shutil.copytree(synthetic_dataset, data)
    from esep_jax.data.dataset import Dataset

    dataset = Dataset(str(data))
    qrels = dataset.qrels("train")
    rng = np.random.default_rng(0)
    lines = ["query-id\tcorpus-id\tscore"]
    queries, docs = dataset.ids("queries"), dataset.ids("corpus")
    for i in range(qrels.num_queries):
        positives, _ = qrels.judgements(i)
        others = rng.choice(len(docs), 20, replace=False)
        for d in sorted(set(others.tolist()) | set(positives.tolist())):
            lines.append(f"{queries[qrels.query_rows[i]]}\t{docs[d]}\t{5.0 if d in positives else 0.0}")
    (tmp_path / "teacher.tsv").write_text("\n".join(lines) + "\n")
    assert main(["teacher", "--data", str(data), "--scores", str(tmp_path / "teacher.tsv"), "--name", "t"]) == 0
    summary = _train(str(data), tmp_path / "run", "--config.loss.teacher=t", "--config.loss.task_weight=0",
                     "--config.loss.teacher_temperature=1.0")
    assert summary["best_dev"]["ndcg@10"] > summary["base_dev"]["ndcg@10"] + 0.01
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[1])
    assert "task_loss" not in record and record["teacher_kl"] > 0  # an inactive term is not computed


@pytest.mark.parametrize("signal", ["targets", "pairs", "listwise", "corpus_listwise"])
def test_distillation_maps_a_rotated_encoder_back_without_qrels(tmp_path, signal):
    """Queries of encoder B = a rotation of A's; distillation onto A's query vectors, onto unlabelled paired
    texts, of B's own ranking of the paired texts (listwise, no target vectors at all), or of A's ranking of
    the whole corpus (corpus listwise, no paired texts) recovers A's retrieval quality on A's index."""
    with_pairs = signal in ("pairs", "listwise")
    sources = write_synthetic_sources(tmp_path / "src", dim=16)
    rng = np.random.default_rng(5)
    rotation, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    a_queries = np.load(sources["queries"])
    np.save(tmp_path / "b_queries.npy", (a_queries @ rotation).astype(np.float32))
    args = ingest_args({**sources, "queries": str(tmp_path / "b_queries.npy")}, tmp_path / "drift")
    if with_pairs:  # texts unrelated to the queries, embedded by both "encoders"
        pairs = rng.normal(size=(500, 16)).astype(np.float32)
        pairs /= np.linalg.norm(pairs, axis=1, keepdims=True)
        np.save(tmp_path / "pair_a.npy", pairs)
        np.save(tmp_path / "pair_b.npy", (pairs @ rotation).astype(np.float32))
        args += ["--paired-source", str(tmp_path / "pair_b.npy"), "--paired-target", str(tmp_path / "pair_a.npy")]
    else:
        args += ["--query-targets", sources["queries"]]
    assert main(args) == 0
    losses = {"listwise": ["--config.loss.listwise_weight=1"],
              "corpus_listwise": ["--config.loss.corpus_listwise_weight=1"]}.get(signal, ["--config.loss.distill=mse"])
    summary = _train(str(tmp_path / "drift"), tmp_path / "run", *losses,
                     "--config.loss.task_weight=0", "--config.loss.recovery_weight=0",
                     "--config.train.num_steps=200", "--config.optim.learning_rate=5e-2", "--config.optim.weight_decay=1e-4")
    assert main(ingest_args(sources, tmp_path / "native")) == 0
    from esep_jax.evaluation.report import evaluate_split

    native = evaluate_split(str(tmp_path / "native"), "dev")["base"]["ndcg@10"]
    assert summary["base_dev"]["ndcg@10"] < native - 0.2  # unmapped B queries are lost in A's space
    assert summary["best_dev"]["ndcg@10"] > native - 0.02


def test_corpus_listwise_with_matryoshka_prefixes_is_a_clear_error(tmp_path, capsys):
    sources = write_synthetic_sources(tmp_path / "src", dim=16)
    assert main(ingest_args(sources, tmp_path / "data") + ["--query-targets", sources["queries"]]) == 0
    code = main(["train", "--data", str(tmp_path / "data"), "--workdir", str(tmp_path / "run"), *FAST,
                 "--config.loss.corpus_listwise_weight=1", "--config.loss.matryoshka_dims=8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "matryoshka_dims" in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("term", ["--config.loss.distill=cosine", "--config.loss.corpus_listwise_weight=1"])
def test_distillation_without_targets_is_a_clear_error(synthetic_dataset, tmp_path, capsys, term):
    code = main(["train", "--data", synthetic_dataset, "--workdir", str(tmp_path / "run"), *FAST, term])
    assert code == 2 and "--query-targets" in capsys.readouterr().err


def test_listwise_distillation_without_paired_texts_is_a_clear_error(synthetic_dataset, tmp_path, capsys):
    code = main(["train", "--data", synthetic_dataset, "--workdir", str(tmp_path / "run"), *FAST,
                 "--config.loss.listwise_weight=1"])
    error = capsys.readouterr().err
    assert code == 2 and "--paired-source" in error and "listwise_weight" in error


def test_listwise_distillation_is_zero_iff_the_head_ranks_like_the_teacher():
    """Teacher: B's scores of texts; student: the head's scores of A's embeddings of the same texts, with A a
    rotation of B. Mapping the queries by that rotation reproduces the teacher exactly (KL 0); the unmapped
    queries do not, and the gradient is (p_head − p_teacher)·docs, which points the head towards the teacher."""
    rng = np.random.default_rng(3)
    rotation, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    texts_b = rng.normal(size=(50, 8)).astype(np.float32)
    texts_a = (texts_b @ rotation).astype(np.float32)
    queries = rng.normal(size=(4, 8)).astype(np.float32)
    teacher_logits = jnp.asarray(queries @ texts_b.T / 0.5)
    mapped = jnp.asarray(queries @ rotation / 0.5)
    assert np.allclose(listwise_distillation_loss(mapped, teacher_logits, jnp.asarray(texts_a)), 0, atol=1e-5)
    unmapped = jnp.asarray(queries / 0.5)
    kl = listwise_distillation_loss(unmapped, teacher_logits, jnp.asarray(texts_a))
    assert (kl > 0.1).all()
    grad = jax.grad(lambda v: listwise_distillation_loss(v, teacher_logits, jnp.asarray(texts_a)).sum())(
        unmapped)
    expected = (jax.nn.softmax(unmapped @ texts_a.T) - jax.nn.softmax(teacher_logits)) @ texts_a
    assert np.allclose(grad, expected, atol=1e-5)


def test_matryoshka_loss_is_the_mean_of_prefix_losses(synthetic_dataset):
    from esep_jax.config import load_config
    from esep_jax.objectives.corpus_softmax import ShardedCorpus, make_data_corpus_mesh
    from esep_jax.data.dataset import Dataset
    from esep_jax.data.loader import TrainBatches

    dataset = Dataset(synthetic_dataset)
    config = load_config(None, ["loss.matryoshka_dims=4,8", "train.batch_size=16", "loss.recovery_weight=0"])
    host = dataset.read_corpus()
    corpus = ShardedCorpus(prefix_corpus(host, [4, 8]), make_data_corpus_mesh(1), 8192)
    batch = TrainBatches(dataset, dataset.qrels("train"), batch_size=16, max_positives=64, seed=0).batch_at(0)
    _, metrics = one_step(config, dataset, batch, {"corpus": (corpus.embeddings, corpus.logit_bias)})
    q = batch["queries"] / config.loss.temperature  # the initial head is the identity
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    expected = np.mean([full_corpus_softmax_loss(q[:, :k], unit(host[:, :k]) if k < 16 else host,
                                                 batch["positive_ids"], batch["positive_weights"], 1.0).mean()
                        for k in (4, 8, 16)])
    np.testing.assert_allclose(float(metrics["task_loss"][0]), expected, rtol=1e-5)


def test_closed_form_initialiser_starts_from_the_fitted_map(tmp_path):
    """Procrustes recovers a rotation exactly: a run started from it is at A's native quality at step 0."""
    sources = write_synthetic_sources(tmp_path / "src", dim=16)
    rotation, _ = np.linalg.qr(np.random.default_rng(5).normal(size=(16, 16)))
    np.save(tmp_path / "b_queries.npy", (np.load(sources["queries"]) @ rotation).astype(np.float32))
    args = ingest_args({**sources, "queries": str(tmp_path / "b_queries.npy")}, tmp_path / "drift")
    assert main(args + ["--query-targets", sources["queries"]]) == 0
    assert main(ingest_args(sources, tmp_path / "native")) == 0
    from esep_jax.evaluation.report import evaluate_split

    native = evaluate_split(str(tmp_path / "native"), "dev")["base"]["ndcg@10"]
    _train(str(tmp_path / "drift"), tmp_path / "run", "--config.model.init=paired_procrustes",
           "--config.train.num_steps=20", "--config.loss.recovery_weight=0")
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["kind"] == "dev" and first["step"] == 0
    assert first["ndcg@10"] == pytest.approx(native, abs=0.01)
    code = main(["train", "--data", str(tmp_path / "native"), "--workdir", str(tmp_path / "bad"), *FAST,
                 "--config.model.init=paired_ridge"])
    assert code == 2  # no target vectors to fit a paired map on


def test_matryoshka_run_is_selected_and_evaluated_per_prefix(synthetic_dataset, tmp_path, capsys):
    _train(synthetic_dataset, tmp_path / "run", "--config.loss.matryoshka_dims=4,8")
    dev = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
           if '"dev"' in line]
    assert set(dev[0]["prefix_ndcg@10"]) == {"4", "8"}
    capsys.readouterr()
    assert main(["eval", "--data", synthetic_dataset, "--workdir", str(tmp_path / "run"),
                 "--json", str(tmp_path / "test.json")]) == 0
    result = json.loads((tmp_path / "test.json").read_text())
    assert set(result["prefixes"]) == {"4", "8", "16"}
    assert result["prefixes"]["16"]["head"]["ndcg@10"] == pytest.approx(result["head"]["ndcg@10"])
    for k in ("4", "8"):  # trained for the truncated index, the head beats the truncated base embeddings
        assert result["prefixes"][k]["head"]["ndcg@10"] > result["prefixes"][k]["base"]["ndcg@10"]
    assert "index of the first 8 dims" in capsys.readouterr().out


def test_drift_tables_are_validated_at_ingest(tmp_path, capsys):
    sources = write_synthetic_sources(tmp_path / "src", dim=16)
    np.save(tmp_path / "wrong_dim.npy", np.ones((300, 8), np.float32))
    np.save(tmp_path / "short.npy", np.ones((299, 16), np.float32))
    base = ingest_args(sources, tmp_path / "out")
    assert main(base + ["--query-targets", str(tmp_path / "wrong_dim.npy")]) == 2
    assert "wrong_dim.npy" in capsys.readouterr().err
    assert main(base + ["--query-targets", str(tmp_path / "short.npy")]) == 2
    assert "short.npy" in capsys.readouterr().err
    assert main(base + ["--paired-source", str(tmp_path / "short.npy")]) == 2  # needs --paired-target too
    assert main(base + ["--paired-source", str(tmp_path / "short.npy"),
                        "--paired-target", str(tmp_path / "wrong_dim.npy")]) == 2
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_listwise_term_is_the_same_in_micro_batches(tmp_path):
    """The paired texts reach the loss whole while the batch (queries and pseudo-queries) is cut into
    micro-batches: one step's listwise term and updated parameters equal those of the undivided batch."""
    from esep_jax.config import load_config
    from esep_jax.objectives.corpus_softmax import ShardedCorpus, make_data_corpus_mesh
    from esep_jax.data.dataset import Dataset
    from esep_jax.data.loader import TrainBatches
    from esep_jax.data.signals import PairedTexts

    sources = write_synthetic_sources(tmp_path / "src", dim=16)
    pairs = np.random.default_rng(2).normal(size=(64, 16)).astype(np.float32)
    np.save(tmp_path / "pair_b.npy", pairs)
    np.save(tmp_path / "pair_a.npy", pairs[:, ::-1].copy())
    assert main(ingest_args(sources, tmp_path / "drift") + [
        "--paired-source", str(tmp_path / "pair_b.npy"), "--paired-target", str(tmp_path / "pair_a.npy")]) == 0
    dataset = Dataset(str(tmp_path / "drift"))
    mesh = make_data_corpus_mesh(1)
    corpus = ShardedCorpus(dataset.read_corpus(), mesh, 8192)
    results = []
    for micro in (0, 4):
        config = load_config(None, ["loss.listwise_weight=1", "train.batch_size=16", "model.head=mlp",
                                    f"train.micro_batch_size={micro}"])
        batch = TrainBatches(dataset, dataset.qrels("train"), batch_size=16, max_positives=64, seed=0, signals=[
            PairedTexts(dataset, batch_size=16, seed=0, shard_count=1)]).batch_at(0)
        paired = tuple(jnp.asarray(dataset.table(f"paired/{side}").read().result()) for side in ("source", "target"))
        state, metrics = one_step(config, dataset, batch, {"corpus": (corpus.embeddings, corpus.logit_bias),
                                                           "paired": paired})
        results.append((float(metrics["listwise"][0]), jax.tree.map(np.asarray, state.params)))
    (whole, params_whole), (micro, params_micro) = results
    assert whole > 0.1
    np.testing.assert_allclose(micro, whole, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params_whole, params_micro)
