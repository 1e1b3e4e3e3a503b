"""The real hub-loading paths (model ids with revisions, hub datasets), exercised offline on
models and data made here."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dispersion.config import parse_config
from dispersion.measure.corpus import documents, hf_documents
from dispersion.core.errors import DataError, ModelError
from dispersion.measure.modeling import load_model, load_tokenizer, resolve_source


@pytest.fixture(scope="module")
def checkpoint_folder(tmp_path_factory):
    """An OLMo-style folder of revisions: root/main-less, root/step0, root/step5."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("ckpts") / "tiny"
    for step in (0, 5):
        torch.manual_seed(step)
        cfg = GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=1)
        GPT2LMHeadModel(cfg).save_pretrained(root / f"step{step}")
    return root


def test_local_revisions_resolve_to_sub_folders(checkpoint_folder):
    src = resolve_source(str(checkpoint_folder), "step5")
    assert src.local and src.location.endswith("step5")
    model = load_model(src, dtype="float32")
    assert model.config.n_layer == 1 and not model.training
    with pytest.raises(ModelError, match=r"revision 'step7' not found .*present: step0, step5"):
        resolve_source(str(checkpoint_folder), "step7", field="models.0.id")
    with pytest.raises(ModelError, match=r"holds checkpoint folders \(step0, step5\), not a model: name the "
                                         r"revisions to scan \(for example revisions: \[step5\]"):
        resolve_source(str(checkpoint_folder), "main", field="models.0.id")  # the parent of the checkpoints
    (checkpoint_folder / "notes").mkdir(exist_ok=True)
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_source(str(checkpoint_folder / "notes"), "main")
    with pytest.raises(ModelError, match="no such model folder"):
        resolve_source(str(checkpoint_folder / "nope"), "main")


def test_hub_ids_keep_their_revision_and_fail_cleanly_offline():
    src = resolve_source("allenai/OLMo-2-0425-1B", "stage1-step10000-tokens21B")
    assert not src.local and src.revision == "stage1-step10000-tokens21B"
    assert src.describe() == "allenai/OLMo-2-0425-1B@stage1-step10000-tokens21B"
    with pytest.raises(ModelError) as err:  # HF_HUB_OFFLINE=1 in tests: nothing is downloaded
        load_tokenizer(resolve_source("dispersion-test/not-a-model", "main"), field="models.3.id")
    assert str(err.value).startswith("models.3.id: cannot load 'dispersion-test/not-a-model@main'")
    assert "\n" not in str(err.value)


def test_hf_dataset_source_on_a_local_parquet_dataset(tmp_path):
    folder = tmp_path / "ds" / "data"
    folder.mkdir(parents=True)
    rows = ["first line", "", "second", "third line", "fourth", "fifth"]
    pq.write_table(pa.table({"article": rows, "id": list(range(6))}), folder / "train-00000.parquet")
    docs = list(hf_documents(str(tmp_path / "ds"), split="train", text_field="article"))
    assert [d.text for d in docs] == [r for r in rows if r]
    assert docs[1].doc_id == "train/2"
    grouped = list(hf_documents(str(tmp_path / "ds"), split="train", text_field="article", group_rows=4))
    assert [d.text for d in grouped] == ["first line\n\nsecond\nthird line", "fourth\nfifth"]
    capped = list(hf_documents(str(tmp_path / "ds"), split="train", text_field="article", max_documents=2))
    assert len(capped) == 2
    with pytest.raises(DataError, match=r"hf.text_field: 'text' is not a column"):
        list(hf_documents(str(tmp_path / "ds"), split="train", text_field="text"))
    cfg = parse_config({"models": [{"name": "m", "zoo": "gpt2-tiny"}],
                        "datasets": [{"name": "local", "hf": {"path": str(tmp_path / "ds"), "text_field": "article"}}]})
    assert len(documents(cfg.datasets[0])) == 5


def test_architectures_without_sdpa_load(tmp_path):
    """Gemma-2 declares no SDPA support: loading must not force an attention implementation."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=32)
    Gemma2ForCausalLM(cfg).save_pretrained(tmp_path / "g")
    model = load_model(resolve_source(str(tmp_path / "g"), "main"), dtype="float32")
    assert type(model).__name__ == "Gemma2ForCausalLM"
