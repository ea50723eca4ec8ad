"""Samples in and out for scoring: `sample --out DIR` writes one PNG per image, `evaluate --samples` reads an .npz
or a folder of image files back exactly (PNG is lossless), shaped for the data, and refuses what does not fit."""

import numpy as np
import pytest
import torch

from pipeline.core.errors import ConfigError
from pipeline.tools.samples import read_samples, write_pngs


@pytest.mark.parametrize("shape", [(6, 28, 28), (6, 3, 32, 32)])
def test_pngs_written_by_sample_read_back_bit_for_bit(tmp_path, shape):
    images = torch.randint(0, 256, shape, dtype=torch.uint8)
    written = write_pngs(images, tmp_path / "out")
    assert [p.name for p in written] == [f"{i:05d}.png" for i in range(6)]
    image_shape = (1, 28, 28) if len(shape) == 3 else (3, 32, 32)
    assert torch.equal(read_samples(str(tmp_path / "out"), image_shape), images)
    np.savez(tmp_path / "s.npz", images=images.numpy())
    assert torch.equal(read_samples(str(tmp_path / "s.npz"), image_shape), images)


def test_a_folder_of_other_sizes_is_resized_as_preparation_does_and_bad_input_is_refused(tmp_path):
    from PIL import Image

    folder = tmp_path / "mine"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((50, 70, 3), 40 * i, np.uint8)).save(folder / f"{i}.jpg")
    images = read_samples(str(folder), (1, 32, 32))
    assert images.shape == (4, 32, 32) and images.dtype == torch.uint8
    with pytest.raises(ConfigError, match="not an empty folder"):
        write_pngs(torch.zeros((2, 8, 8), dtype=torch.uint8), folder)
    assert len(list(folder.iterdir())) == 4  # nothing of the user's overwritten
    np.savez(tmp_path / "wrong.npz", images=np.zeros((5, 3, 28, 28), np.uint8))
    with pytest.raises(ConfigError, match=r"must be uint8 of shape \(N, 28, 28\)"):
        read_samples(str(tmp_path / "wrong.npz"), (1, 28, 28))
    with pytest.raises(ConfigError, match="not found"):
        read_samples(str(tmp_path / "nothing"), (1, 28, 28))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no image files"):
        read_samples(str(tmp_path / "empty"), (1, 28, 28))
