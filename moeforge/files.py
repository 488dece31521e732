"""Names of the files moeforge writes or copies beside the weights, shared by every layer that touches them."""

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.txt",
)
GENERATION_CONFIG = "generation_config.json"
MODEL_CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
RESOLVED_CONFIG = "moeforge_config.yml"  # the exact recipe, with the seed
MANIFEST = "moeforge_manifest.json"
CARD = "README.md"
