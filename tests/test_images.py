import io

import numpy as np
import pytest
from PIL import Image

from vrc_dist.data.images import MAX_PIXELS, ImageError, load_image


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def test_rgb_passes_through_and_paths_work(tmp_path):
    img = Image.fromarray(np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3))
    path = tmp_path / "a.png"
    img.save(path)
    for source in (encode(img), path, str(path)):
        out = load_image(source, "a.png")
        assert out.mode == "RGB" and out.size == (6, 4)
        assert np.array_equal(np.asarray(out), np.asarray(img))


def test_grayscale_and_bilevel_become_rgb():
    gray = Image.fromarray(np.full((4, 4), 77, dtype=np.uint8))
    assert np.asarray(load_image(encode(gray), "g")).tolist()[0][0] == [77, 77, 77]
    assert load_image(encode(Image.new("1", (4, 4), 1)), "b").getpixel((0, 0)) == (255, 255, 255)


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    out = load_image(encode(rgba), "t.png")
    assert out.getpixel((0, 0)) == (255, 0, 0)  # opaque: kept
    assert out.getpixel((3, 3)) == (255, 255, 255)  # transparent: white, not the hidden red
    assert all(abs(c - 127) <= 1 for c in out.getpixel((1, 0)))  # half black over white
    la = Image.new("LA", (4, 4), (0, 0))
    assert load_image(encode(la), "la.png").getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_transparency_uses_white():
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.info["transparency"] = 0
    out = load_image(encode(pal), "p.png")
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (10, 200, 30)


def test_sixteen_bit_grayscale_is_rescaled_not_clipped():
    a = np.array([[0, 32768], [65535, 257]], dtype=np.uint16)
    out = np.asarray(load_image(encode(Image.fromarray(a)), "deep.png"))[..., 0]
    assert out.tolist() == [[0, 128], [255, 1]]


def test_float_grayscale_in_unit_range_is_scaled():
    a = np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32)
    out = np.asarray(load_image(encode(Image.fromarray(a, "F"), "TIFF"), "f.tif"))[..., 0]
    assert out.tolist() == [[0, 128], [255, 64]]


def test_cmyk_becomes_rgb():
    out = load_image(encode(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG"), "c.jpg")
    r, g, b = out.getpixel((2, 2))
    assert out.mode == "RGB" and r > 200 and g < 60 and b < 60


@pytest.mark.parametrize("size", [(1, 1), (1, 50), (50, 1)])
def test_too_small_is_refused_by_name(size):
    with pytest.raises(ImageError, match=r"dot\.png: image is \d+x\d+ pixels"):
        load_image(encode(Image.new("RGB", size)), "dot.png")


def test_huge_is_refused_before_decoding():
    side = int(MAX_PIXELS**0.5) + 100  # a bilevel PNG of this size is a few kB on disk
    with pytest.raises(ImageError, match=r"bomb\.png: .*MP"):
        load_image(encode(Image.new("1", (side, side))), "bomb.png")


@pytest.mark.parametrize("data", [b"", b"not an image at all", encode(Image.new("RGB", (32, 32)))[:60]])
def test_undecodable_is_refused_by_name(data):
    with pytest.raises(ImageError, match="shard-7/img-3"):
        load_image(data, "shard-7/img-3")


def test_missing_file_is_refused_by_name(tmp_path):
    with pytest.raises(ImageError, match="nope.png: no such file"):
        load_image(tmp_path / "nope.png", "nope.png")
