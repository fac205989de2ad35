"""Write the model-file fixtures of tests/old_formats/model_file/ with the library of the commit the
restructuring started from (its ``networks.save_model``, before the model file had a module of its own).

Run from a checkout of that commit, with it first on the import path:

    cd <old checkout> && PYTHONPATH=. OMP_NUM_THREADS=1 python <this repository>/tests/old_formats/write_model_file.py

Writes, beside this script:
- ``model_file/siamese_network.pt``: a small SiameseNetwork (16 x 16 grey images, 8 channels, 2 blocks,
  embedding dimension 4; about 11 KB: the classic EmbeddingNet's fixed 32/64-channel convolutions and
  256-wide dense layers make it at least 530 KB) with BatchNorm statistics moved off their defaults,
  a normalisation, class names, a threshold, a command, metrics and an extra key;
- ``model_file/expected.pt``: what the old code read back from it (``info``), the weights' fingerprint,
  five fixed input images and the old code's embeddings of them, with the stored normalisation
  (``embed_images``) and without it (``get_embedding``).
"""

import os

import torch

from networks import SiameseNetwork, embed_images, load_model, model_fingerprint, save_model

FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_file")


def main():
    torch.manual_seed(0)
    model = SiameseNetwork(image_size=16, embedding_dim=4, in_channels=1, channels=8, n_blocks=2)
    model.train()
    with torch.no_grad():
        model.get_embedding(torch.rand(6, 1, 16, 16))  # BatchNorm's running statistics move off their defaults
    model.eval()
    path = save_model(os.path.join(FOLDER, "siamese_network.pt"), model, "siamese-network", None, image_size=16,
                      channels=1, normalization={"mean": [0.25], "std": [0.5]}, class_names=["a", "b", "c"],
                      threshold=0.4, command="python write_model_file.py", metrics={"accuracy": 0.75},
                      recipe={"epochs": 2, "scale": (0.9, 1.1)})
    loaded, info = load_model(path)
    inputs = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        raw = loaded.get_embedding(inputs)
    expected = {"info": info, "fingerprint": model_fingerprint(loaded.state_dict()), "inputs": inputs,
                "embeddings": embed_images(loaded, inputs, normalization=info["normalization"]),
                "raw_embeddings": raw}
    torch.save(expected, os.path.join(FOLDER, "expected.pt"))
    print(f"wrote {path} ({os.path.getsize(path)} bytes) and expected.pt")


if __name__ == "__main__":
    main()
