import numpy as np
import pytest
import torch
from skimage.feature import hog as skimage_hog

from cbmir.extractors import create_extractor
from cbmir.extractors.hog import hog_descriptors
from cbmir.extractors.imaging import resize_batch


@pytest.mark.parametrize(
    ("shape", "cell", "block", "bins"), [((256, 256), 64, 2, 15), ((200, 300), 32, 3, 9), ((96, 128), 16, 2, 8)]
)
def test_hog_matches_skimage(shape, cell, block, bins):
    image = np.random.default_rng(1).random(shape)
    expected = skimage_hog(
        image,
        orientations=bins,
        pixels_per_cell=(cell, cell),
        cells_per_block=(block, block),
        block_norm="L2-Hys",
        feature_vector=True,
    )
    ours = hog_descriptors(torch.from_numpy(image)[None], cell, block, bins)[0].numpy()
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, atol=1e-6)


def test_hog_extractor_defaults_are_the_papers_540_dims_and_match_skimage_on_a_radiograph():
    from cbmir.extractors.imaging import decode_image
    from tests.helpers import UNIFESP, require

    image = decode_image((require(UNIFESP) / "images" / "00000.png").read_bytes())
    ex = create_extractor("hog", device="cpu")
    assert ex.dim == 540 and ex.metric == "l1"
    ours = ex.extract([image, image[::-1]])
    resized = resize_batch([image], 256)[0].astype(np.float64)
    expected = skimage_hog(
        resized, orientations=15, pixels_per_cell=(64, 64), cells_per_block=(2, 2), block_norm="L2-Hys"
    )
    np.testing.assert_allclose(ours[0], expected, atol=1e-5)
    assert not np.allclose(ours[0], ours[1])  # a flipped image is described differently


def test_hog_rejects_images_smaller_than_a_block():
    with pytest.raises(ValueError, match="too small"):
        hog_descriptors(torch.zeros(1, 64, 64), cell=64, block=2)
