import pytest


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, llava_pair):
    """The session's tiny LLaVA saved as a Hugging Face folder in several safetensors shards with an index."""
    hf, processor, _ = llava_pair
    folder = tmp_path_factory.mktemp("sharded-llava")
    hf.save_pretrained(folder, max_shard_size="60KB")
    processor.save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 3
    return folder
