"""Tests for image_folders.py: read_image, list_images, folder_identity, load_image_folder, ImageFileDataset,
channel_statistics, normalized, load_folder_splits' pieces and export_image_folder (the generic splits it
uses, split_per_class and held_out_class_split, are tested in test_datasets.py).

Every test writes its own images with PIL under tmp_path (fixed seeds), so nothing depends on the
machine's data.
"""

import io
import os
import pickle
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, features

import image_folders
import known_datasets
from datasets import InMemoryDataset
from fixtures import write_idx_fixture
from folder_fixtures import class_folder, noise, save
from image_folders import (ImageFileDataset, channel_statistics, folder_identity, list_images, load_image_folder,
                           normalized, read_image)


def jpeg_bytes(seed=0, size=(32, 32)):
    buffer = io.BytesIO()
    noise(seed, size).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def pil_pixels(path, mode, size=None):
    """Direct PIL conversion of ``path`` to ``mode`` (resized bilinearly to ``size``), (C, H, W) in [0, 1]."""
    with Image.open(path) as image:
        image = image.convert(mode)
        if size is not None:
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.float32) / 255
    return torch.from_numpy(array.reshape(array.shape[0], array.shape[1], -1)).permute(2, 0, 1)


def mixed_folder(root):
    """Three classes of images in modes 1, L, P, RGB, RGBA, LA, in PNG, JPEG, BMP, WebP and GIF, of
    several sizes."""
    root = str(root)
    save(f"{root}/ant/rgb.png", noise(1, (12, 12)))
    save(f"{root}/ant/photo.JPG", noise(2, (20, 14)), quality=95)
    rgba = noise(3, (10, 10)).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.array([0, 128, 255, 255, 0], np.uint8), (10, 2))))
    save(f"{root}/ant/rgba.png", rgba)
    save(f"{root}/bee/grey.png", noise(4, (16, 16), "L"))
    save(f"{root}/bee/binary.png", noise(5, (9, 9), "L").convert("1"))
    save(f"{root}/bee/palette.png", noise(6, (12, 12)).convert("P"))
    la = Image.merge("LA", [noise(7, (12, 12), "L"), noise(8, (12, 12), "L")])
    save(f"{root}/bee/la.png", la)
    save(f"{root}/cow/bitmap.bmp", noise(9, (12, 12)))
    save(f"{root}/cow/animation.gif", noise(10, (12, 12), "L"))
    if features.check("webp"):
        save(f"{root}/cow/web.webp", noise(11, (12, 12)), lossless=True)
    return root


# ---------------------------------------------------------------------------------------------------
# read_image


def test_read_image_matches_direct_pil_conversion(tmp_path):
    root = mixed_folder(tmp_path)
    for name, mode in [("ant/rgb.png", "RGB"), ("ant/photo.JPG", "RGB"), ("bee/grey.png", "L"),
                       ("bee/binary.png", "L"), ("bee/palette.png", "RGB"), ("cow/bitmap.bmp", "RGB"),
                       ("cow/animation.gif", "L")]:
        path = os.path.join(root, name)
        channels = 3 if mode == "RGB" else 1
        with Image.open(path) as image:
            native = image.size
        if native[0] == native[1]:  # no resizing: the exact PIL pixels
            image = read_image(path, native[0], channels)
            assert image.dtype == torch.float32 and image.shape == (channels, native[0], native[0])
            torch.testing.assert_close(image, pil_pixels(path, mode))
        resized = read_image(path, 6, channels)
        assert resized.shape == (channels, 6, 6)
        torch.testing.assert_close(resized, pil_pixels(path, mode, 6))
    # a colour image read as grey is PIL's 'L' conversion; a grey one read as RGB repeats it
    torch.testing.assert_close(read_image(f"{root}/ant/rgb.png", 12, 1), pil_pixels(f"{root}/ant/rgb.png", "L"))
    grey = read_image(f"{root}/bee/grey.png", 16, 3)
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[0], grey[2])
    torch.testing.assert_close(grey[:1], pil_pixels(f"{root}/bee/grey.png", "L"))


def test_read_image_composites_transparency_on_white(tmp_path):
    root = mixed_folder(tmp_path)
    rgba = read_image(f"{root}/ant/rgba.png", 10, 3)
    with Image.open(f"{root}/ant/rgba.png") as image:
        source = np.asarray(image, dtype=np.float32) / 255
    alpha = torch.from_numpy(source[:, :, 3])
    colour = torch.from_numpy(source[:, :, :3]).permute(2, 0, 1)
    expected = colour * alpha + (1 - alpha)  # alpha-weighted mix with white
    torch.testing.assert_close(rgba, expected, atol=1.5 / 255, rtol=0)
    assert (rgba[:, alpha == 0] == 1).all() and torch.equal(rgba[:, alpha == 1], colour[:, alpha == 1])
    la = read_image(f"{root}/bee/la.png", 12, 1)
    with Image.open(f"{root}/bee/la.png") as image:
        grey, alpha = (np.asarray(band, dtype=np.float32) / 255 for band in image.split())
    torch.testing.assert_close(la[0], torch.from_numpy(grey * alpha + 1 - alpha), atol=1.5 / 255, rtol=0)
    # a palette colour marked transparent comes out white
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    palette.putpixel((0, 0), 1)
    path = save(f"{tmp_path}/transparent.png", palette, transparency=0)
    image = read_image(path, 4, 3)
    assert (image[:, 1:, :] == 1).all() and torch.allclose(image[:, 0, 0], torch.tensor([200, 10, 10]) / 255)


def test_read_image_scales_16_bit_grey(tmp_path):
    values = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    path = save(f"{tmp_path}/deep.png", Image.fromarray(values))
    with Image.open(path) as image:
        assert image.mode.startswith("I")
    image = read_image(path, 2, 1)
    torch.testing.assert_close(image[0], torch.from_numpy(values.astype(np.float32) / 65535))
    assert read_image(path, 1, 3).shape == (3, 1, 1)


def test_read_image_errors_name_the_file(tmp_path):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    truncated_jpeg = tmp_path / "cut.jpg"
    truncated_jpeg.write_bytes(jpeg_bytes()[:len(jpeg_bytes()) // 2])
    png = io.BytesIO()
    noise(0, (32, 32)).save(png, format="PNG")
    truncated_png = tmp_path / "cut.png"
    truncated_png.write_bytes(png.getvalue()[:len(png.getvalue()) // 2])
    for path in (corrupt, truncated_jpeg, truncated_png, tmp_path / "missing.png"):
        with pytest.raises(ValueError, match=f"cannot read image {path}: .*--skip-bad-images"):
            read_image(path, 8, 3)
    good = save(f"{tmp_path}/good.png", noise(0, (4, 4)))
    with pytest.raises(ValueError, match="image_size"):
        read_image(good, 0, 3)
    with pytest.raises(TypeError, match="image_size"):
        read_image(good, 4.0, 3)
    with pytest.raises(ValueError, match="channels"):
        read_image(good, 4, 2)


# ---------------------------------------------------------------------------------------------------
# list_images


def test_list_images_one_level_folder(tmp_path):
    root = class_folder(tmp_path / "data", {"zebra": 2, "apple": 3})
    save(f"{root}/apple/UPPER.PNG", noise(0, (8, 8)))
    save(f"{root}/apple/.hidden.png", noise(0, (8, 8)))
    (tmp_path / "data" / "apple" / "notes.txt").write_text("not an image")
    (tmp_path / "data" / "README.md").write_text("ignored")
    class_folder(tmp_path / "data" / ".cache", {"x": 1})
    listing = list_images(root)
    assert listing.classes == ["apple", "zebra"]
    assert listing.paths == [os.path.join(root, "apple", name) for name in ("0.png", "1.png", "2.png", "UPPER.PNG")] + [
        os.path.join(root, "zebra", name) for name in ("0.png", "1.png")]
    assert listing.labels.tolist() == [0, 0, 0, 0, 1, 1] and listing.labels.dtype == torch.long
    assert listing.groups is None and listing.group_names is None


def test_list_images_two_level_layout(tmp_path):
    root = str(tmp_path)
    for group, characters in {"Latin": ["b", "a"], "Greek": ["alpha"], "Latin-2": ["c"]}.items():
        for character in characters:
            class_folder(f"{root}/{group}", {character: 2})
    listing = list_images(root)
    assert listing.group_names == ["Greek", "Latin", "Latin-2"]
    assert listing.classes == ["Greek/alpha", "Latin/a", "Latin/b", "Latin-2/c"]  # by group, then class
    assert listing.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert listing.groups.tolist() == [0, 0, 1, 1, 1, 1, 2, 2]
    assert listing.paths[2] == os.path.join(root, "Latin", "a", "0.png")


def test_list_images_csv(tmp_path):
    images = class_folder(tmp_path / "images", {"x": 3})
    absolute = os.path.join(images, "x", "2.png")
    lines = ["images/x/0.png,10", "", " images/x/1.png , 9 ", f"{absolute},10"]
    for header in ([], ["path,label"]):
        csv_path = tmp_path / "list.csv"
        csv_path.write_text("\n".join(header + lines) + "\n")
        listing = list_images(csv_path)
        assert listing.classes == ["9", "10"]  # integer labels sort as numbers
        assert listing.labels.tolist() == [1, 0, 1]
        assert listing.paths == [os.path.join(images, "x", "0.png"), os.path.join(images, "x", "1.png"), absolute]
        assert listing.groups is None
    (tmp_path / "names.csv").write_text("images/x/0.png,dog\nimages/x/1.png,cat\n")
    assert list_images(tmp_path / "names.csv").classes == ["cat", "dog"]


def test_list_images_csv_errors(tmp_path):
    class_folder(tmp_path, {"x": 2})
    cases = {"three.csv": ("x/0.png,a\nx/1.png,b,extra\n", "three.csv line 2: expected 'path,label'"),
             "blank_label.csv": ("path,label\nx/0.png,\n", "blank_label.csv line 2: expected"),
             "missing.csv": ("x/0.png,a\n\nx/nope.png,b\n", "missing.csv line 3: image file .*nope.png does not exist"),
             "empty.csv": ("path,label\n", "empty.csv lists no images"),
             "one.csv": ("x/0.png,a\nx/1.png,a\n", "at least 2 classes; found 1 \\('a'\\) in .*one.csv")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            list_images(tmp_path / name)
    (tmp_path / "list.txt").write_text("x/0.png,a\n")
    with pytest.raises(ValueError, match="list.txt is a file but not a .csv file"):
        list_images(tmp_path / "list.txt")


def test_list_images_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        list_images(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty holds no class sub-folders; expected one sub-folder"):
        list_images(tmp_path / "empty")
    flat = tmp_path / "flat"
    save(f"{flat}/a.png", noise(0, (4, 4)))
    with pytest.raises(ValueError, match="flat holds images but no class sub-folders"):
        list_images(flat)
    mixed = class_folder(tmp_path / "mixed", {"a": 1, "b": 1})
    save(f"{mixed}/stray.png", noise(0, (4, 4)))
    with pytest.raises(ValueError, match="mixed mixes images \\(e.g. stray.png\\) and class folders"):
        list_images(mixed)
    inner = class_folder(tmp_path / "inner", {"a": 1, "b": 1})
    save(f"{inner}/a/deeper/x.png", noise(0, (4, 4)))
    with pytest.raises(ValueError, match=f"{os.path.join(inner, 'a')} mixes images and sub-folders"):
        list_images(inner)
    levels = class_folder(tmp_path / "levels", {"a": 1, "g/b": 1})
    with pytest.raises(ValueError, match="levels mixes class folders of images \\(e.g. a\\) and folders of folders"):
        list_images(levels)
    deep = class_folder(tmp_path / "deep", {"g/a": 1, "g/b/c": 1})
    with pytest.raises(ValueError, match=f"{os.path.join(deep, 'g', 'b')} holds sub-folders"):
        list_images(deep)
    (tmp_path / "hollow" / "a").mkdir(parents=True)
    (tmp_path / "hollow" / "a" / "notes.txt").write_text("")
    with pytest.raises(ValueError, match="hollow holds no images in its sub-folders"):
        list_images(tmp_path / "hollow")
    single = class_folder(tmp_path / "single", {"only": 3})
    with pytest.raises(ValueError, match="metric learning needs at least 2 classes; found 1 \\('only'\\)"):
        list_images(single)


def test_list_images_warns_about_empty_class_folders(tmp_path):
    root = class_folder(tmp_path / "one", {"a": 2, "b": 1})
    (tmp_path / "one" / "empty").mkdir()
    with pytest.warns(UserWarning, match=f"{os.path.join(root, 'empty')} holds no images; it is left out"):
        listing = list_images(root)
    assert listing.classes == ["a", "b"] and listing.labels.tolist() == [0, 0, 1]
    two = class_folder(tmp_path / "two", {"g/a": 1, "g/b": 1, "h/c": 1})
    (tmp_path / "two" / "g" / "hollow").mkdir()
    (tmp_path / "two" / "bare").mkdir()
    with pytest.warns(UserWarning) as record:
        listing = list_images(two)
    messages = sorted(str(warning.message) for warning in record)
    assert messages == [f"{os.path.join(two, 'bare')} holds no images; it is left out",
                        f"{os.path.join(two, 'g', 'hollow')} holds no images; it is left out"]
    assert listing.classes == ["g/a", "g/b", "h/c"] and listing.group_names == ["g", "h"]
    (tmp_path / "three" / "a").mkdir(parents=True)
    class_folder(tmp_path / "three", {"b": 1})
    with pytest.warns(UserWarning, match="holds no images"), pytest.raises(ValueError, match="at least 2 classes"):
        list_images(tmp_path / "three")


# ---------------------------------------------------------------------------------------------------
# folder_identity


def identity_folder(root):
    return class_folder(root, {"g/a": 3, "g/b": 2, "h/c": 2}, size=(6, 6))


def test_folder_identity_is_the_same_for_the_same_data_anywhere(tmp_path):
    root = identity_folder(tmp_path / "one" / "train")
    identity = folder_identity(root)
    assert identity == folder_identity(root) == folder_identity(tmp_path / "one" / "train" / ".")
    assert set(identity) == {"path", "fingerprint", "images", "classes"}
    assert identity["path"] == os.path.realpath(root) and (identity["images"], identity["classes"]) == (7, 3)
    assert re.fullmatch("[0-9a-f]{64}", identity["fingerprint"])
    copy = shutil.copytree(root, tmp_path / "two" / "train")
    os.utime(os.path.join(copy, "g", "a", "0.png"), (0, 0))  # the times are no part of the data
    other = folder_identity(copy)
    assert other["fingerprint"] == identity["fingerprint"]
    assert other["path"] == os.path.realpath(copy) != identity["path"]
    link = tmp_path / "link"
    link.symlink_to(root, target_is_directory=True)
    assert folder_identity(link) == identity  # the resolved path


def test_folder_identity_changes_with_any_file_added_removed_relabelled_or_resized(tmp_path):
    def changed(change):
        root = identity_folder(tmp_path / f"case{len(os.listdir(tmp_path))}")
        before = folder_identity(root)["fingerprint"]
        change(root)
        return folder_identity(root)["fingerprint"] != before

    assert changed(lambda root: save(os.path.join(root, "h", "c", "9.png"), noise(99, (6, 6))))  # added
    assert changed(lambda root: os.remove(os.path.join(root, "g", "a", "0.png")))  # removed
    assert changed(lambda root: os.replace(os.path.join(root, "g", "a", "0.png"),
                                           os.path.join(root, "g", "b", "0a.png")))  # relabelled
    assert changed(lambda root: os.replace(os.path.join(root, "g", "a", "0.png"),
                                           os.path.join(root, "g", "a", "9.png")))  # renamed
    assert changed(lambda root: save(os.path.join(root, "g", "a", "0.png"), noise(1, (7, 7))))  # resized
    assert not changed(lambda root: open(os.path.join(root, "g", "notes.txt"), "w").close())  # not an image
    assert changed(lambda root: os.rename(os.path.join(root, "h"), os.path.join(root, "i")))  # group renamed


def test_folder_identity_of_a_csv_and_without_decoding_any_image(tmp_path, monkeypatch):
    root = identity_folder(tmp_path / "images")
    listing = list_images(root)
    lines = [f"{os.path.relpath(path, tmp_path)},{listing.classes[label]}"
             for path, label in zip(listing.paths, listing.labels.tolist())]
    (tmp_path / "list.csv").write_text("path,label\n" + "\n".join(lines) + "\n")
    monkeypatch.setattr(Image, "open", lambda *args, **kwargs: pytest.fail("an image was opened"))
    identity = folder_identity(tmp_path / "list.csv")
    assert identity["path"] == os.path.realpath(tmp_path / "list.csv") and identity["images"] == 7
    assert identity["fingerprint"] != folder_identity(root)["fingerprint"]  # paths relative to another folder
    (tmp_path / "list.csv").write_text("path,label\n" + "\n".join(lines[:-1]) + "\n")
    assert folder_identity(tmp_path / "list.csv")["fingerprint"] != identity["fingerprint"]
    monkeypatch.chdir(tmp_path)
    assert folder_identity("list.csv")["path"] == os.path.realpath(tmp_path / "list.csv")
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        folder_identity(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------------
# load_image_folder


def test_load_image_folder_mixed_modes_and_sizes(tmp_path):
    root = mixed_folder(tmp_path)
    with pytest.raises(ValueError, match="not all square and of one size .*pass image_size \\(--image-size\\)"):
        load_image_folder(root, progress=False)
    dataset = load_image_folder(root, image_size=8, progress=False)
    n = 10 if features.check("webp") else 9
    assert isinstance(dataset, InMemoryDataset)
    assert dataset.data.shape == (n, 3, 8, 8) and dataset.channels == 3 and dataset.image_size == 8
    assert dataset.classes == ["ant", "bee", "cow"] and dataset.targets.tolist()[:7] == [0, 0, 0, 1, 1, 1, 1]
    assert 0 <= dataset.data.min() and dataset.data.max() <= 1
    assert dataset.mean == (0.0,) * 3 and dataset.std == (1.0,) * 3 and dataset.skipped == []
    assert dataset.groups is None and dataset.group_names is None and len(dataset.paths) == n
    for k in (0, 1, 4, n - 1):
        assert torch.equal(dataset.data[k], read_image(dataset.paths[k], 8, 3))
        image, target = dataset[k]
        assert target == dataset.targets[k]
    torch.testing.assert_close(dataset.data[0], pil_pixels(dataset.paths[0], "RGB", 8))
    grey = load_image_folder(root, image_size=5, channels=1, progress=False)
    assert grey.data.shape == (n, 1, 5, 5) and grey.channels == 1
    torch.testing.assert_close(grey.data[3], pil_pixels(grey.paths[3], "L", 5))


def test_load_image_folder_infers_size_and_channels(tmp_path):
    grey = class_folder(tmp_path / "grey", {"a": 2, "b": 2}, size=(6, 6), mode="L")
    save(f"{grey}/b/binary.png", noise(0, (6, 6), "L").convert("1"))
    dataset = load_image_folder(grey, progress=False)
    assert dataset.data.shape == (5, 1, 6, 6) and dataset.channels == 1 and dataset.image_size == 6
    save(f"{grey}/a/palette.png", noise(0, (6, 6)).convert("P"))
    assert load_image_folder(grey, progress=False).channels == 3
    oblong = class_folder(tmp_path / "oblong", {"a": 1, "b": 1}, size=(6, 4))
    with pytest.raises(ValueError, match="6x4.*--image-size"):
        load_image_folder(oblong, progress=False)
    assert load_image_folder(oblong, image_size=3, progress=False).data.shape == (2, 3, 3, 3)
    with pytest.raises(ValueError, match="channels"):
        load_image_folder(grey, channels=4, progress=False)
    with pytest.raises(ValueError, match="image_size"):
        load_image_folder(grey, image_size=0, progress=False)


def test_load_image_folder_two_levels_and_csv(tmp_path):
    root = class_folder(tmp_path / "two", {"g/a": 2, "g/b": 1, "h/c": 3})
    dataset = load_image_folder(root, progress=False)
    assert dataset.classes == ["g/a", "g/b", "h/c"] and dataset.group_names == ["g", "h"]
    assert dataset.groups.tolist() == [0, 0, 0, 1, 1, 1]
    (tmp_path / "list.csv").write_text("path,label\ntwo/h/c/0.png,c\ntwo/g/a/1.png,a\n")
    listed = load_image_folder(tmp_path / "list.csv", progress=False)
    assert listed.classes == ["a", "c"] and listed.targets.tolist() == [1, 0]
    assert torch.equal(listed.data[0], dataset.data[3]) and listed.groups is None


def bad_folder(root):
    """Classes a (3 good, a corrupt .png, a truncated .jpg), b (2 good), c (only a corrupt file)."""
    root = class_folder(root, {"a": 3, "b": 2})
    rng = np.random.default_rng(1)
    root_a = os.path.join(root, "a")
    with open(os.path.join(root_a, "corrupt.png"), "wb") as file:
        file.write(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    data = jpeg_bytes(seed=3, size=(8, 8))
    with open(os.path.join(root_a, "cut.jpg"), "wb") as file:
        file.write(data[:len(data) // 2])
    os.makedirs(os.path.join(root, "c"))
    with open(os.path.join(root, "c", "bad.png"), "wb") as file:
        file.write(b"\x89PNG not really")
    return root


@pytest.mark.parametrize("memory", [True, False])
def test_load_image_folder_bad_images(tmp_path, memory):
    root = bad_folder(tmp_path)
    limit = {} if memory else {"max_memory_bytes": 1}
    with pytest.raises(ValueError, match="cannot read image .*(corrupt.png|cut.jpg|bad.png).*--skip-bad-images"):
        load_image_folder(root, progress=False, **limit)
    # image_size and channels given: nothing is probed first, the truncated file fails while decoding
    with pytest.raises(ValueError, match="cannot read image .*"):
        load_image_folder(root, image_size=8, channels=3, progress=False, max_memory_bytes=2 ** 30)
    with pytest.warns(UserWarning) as record:
        dataset = load_image_folder(root, skip_bad_images=True, progress=False, **limit)
    messages = [str(warning.message) for warning in record]
    bad = [os.path.join(root, "a", "corrupt.png"), os.path.join(root, "a", "cut.jpg"),
           os.path.join(root, "c", "bad.png")]
    assert sorted(dataset.skipped) == sorted(bad)
    assert any(f"{os.path.join(root, 'c')} (class 'c') holds no readable images; it is left out" in m for m in messages)
    skipped = [m for m in messages if m.startswith("skipped")]
    assert len(skipped) == 1 and skipped[0].startswith("skipped 3 unreadable image file(s)")
    assert all(path in skipped[0] for path in bad)
    assert isinstance(dataset, InMemoryDataset if memory else ImageFileDataset)
    assert dataset.classes == ["a", "b"] and dataset.targets.tolist() == [0, 0, 0, 1, 1] and len(dataset) == 5
    assert all(not path.endswith(("corrupt.png", "cut.jpg", "bad.png")) for path in dataset.paths)
    for k in range(5):
        assert torch.equal(dataset[k][0], read_image(dataset.paths[k], 8, 3))


def test_skip_bad_images_warning_lists_the_first_few(tmp_path):
    root = class_folder(tmp_path, {"a": 1, "b": 1})
    for k in range(7):
        (tmp_path / "a" / f"bad{k}.png").write_bytes(b"junk")
    with pytest.warns(UserWarning, match="skipped 7 unreadable image file\\(s\\)") as record:
        dataset = load_image_folder(root, skip_bad_images=True, progress=False)
    message = str(record[0].message)
    assert len(re.findall(r"bad\d\.png", message)) == 5 and message.endswith(", ...") and len(dataset.skipped) == 7
    (tmp_path / "b" / "0.png").write_bytes(b"junk")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="at least 2 classes; found 1 \\('a'\\)"):
        load_image_folder(root, skip_bad_images=True, progress=False)


def test_skipped_class_drops_its_group(tmp_path):
    root = class_folder(tmp_path, {"g/a": 1, "g/b": 2, "h/c": 1, "i/d": 1})
    (tmp_path / "h" / "c" / "0.png").write_bytes(b"junk")
    with pytest.warns(UserWarning) as record:
        dataset = load_image_folder(root, skip_bad_images=True, progress=False)
    messages = [str(warning.message) for warning in record]
    assert len(messages) == 2 and messages[1].startswith("skipped 1 unreadable image file(s)")
    assert messages[0] == f"{os.path.join(root, 'h', 'c')} (class 'h/c') holds no readable images; it is left out"
    assert dataset.classes == ["g/a", "g/b", "i/d"] and dataset.targets.tolist() == [0, 1, 1, 2]
    assert dataset.group_names == ["g", "i"] and dataset.groups.tolist() == [0, 0, 0, 1]


def test_streaming_checks_headers_and_memory_limit(tmp_path):
    root = bad_folder(tmp_path)
    # size and channels given: the streaming path still opens every file's header before returning
    with pytest.raises(ValueError, match="cannot read image .*(corrupt|bad).png"):
        load_image_folder(root, image_size=8, channels=3, progress=False, max_memory_bytes=0)
    for bad in (-1, 1.5):
        with pytest.raises((TypeError, ValueError), match="max_memory_bytes"):
            load_image_folder(root, image_size=8, channels=3, progress=False, max_memory_bytes=bad)


def test_streaming_dataset_matches_in_memory(tmp_path):
    root = class_folder(tmp_path, {"g/a": 3, "g/b": 2, "h/c": 2}, size=(7, 7))
    memory = load_image_folder(root, image_size=5, progress=False)
    stream = load_image_folder(root, image_size=5, progress=False, max_memory_bytes=memory.data.numel() * 4 - 1)
    assert isinstance(stream, ImageFileDataset) and len(stream) == len(memory) == 7
    for name in ("classes", "paths", "group_names", "image_size", "channels", "skipped", "mean", "std"):
        assert getattr(stream, name) == getattr(memory, name), name
    assert torch.equal(stream.targets, memory.targets) and torch.equal(stream.groups, memory.groups)
    for k in range(len(memory)):
        image, target = stream[k]
        assert torch.equal(image, memory.data[k]) and target == int(memory.targets[k])
    copy = pickle.loads(pickle.dumps(stream))  # what DataLoader workers receive
    assert torch.equal(copy[6][0], memory.data[6])
    batch, targets = next(iter(torch.utils.data.DataLoader(stream, batch_size=7)))
    assert torch.equal(batch, memory.data) and torch.equal(targets, memory.targets)
    part = stream.subset(torch.tensor([6, 0]))
    assert part.paths == [memory.paths[6], memory.paths[0]] and part.groups.tolist() == [1, 0]
    with pytest.raises(ValueError, match="labels must hold one class id per path"):
        ImageFileDataset(memory.paths, [0, 1], 5, 3, memory.classes)


def test_in_memory_subset_keeps_image_attributes(tmp_path):
    dataset = load_image_folder(class_folder(tmp_path, {"g/a": 2, "h/b": 2}), progress=False)
    part = dataset.subset(torch.tensor([False, True, True, False]))
    assert part.paths == dataset.paths[1:3] and part.groups.tolist() == [0, 1]
    assert part.group_names == ["g", "h"] and part.image_size == 8 and part.channels == 3
    assert dataset.subset(slice(2, None)).paths == dataset.paths[2:]


# ---------------------------------------------------------------------------------------------------
# channel_statistics and normalized


def test_channel_statistics_match_float64_brute_force(tmp_path):
    root = class_folder(tmp_path, {"a": 4, "b": 5}, size=(6, 6))
    memory = load_image_folder(root, progress=False)
    mean, std = channel_statistics(memory)
    pixels = memory.data.double().transpose(0, 1).reshape(3, -1)
    assert len(mean) == len(std) == 3
    np.testing.assert_allclose(mean, pixels.mean(1).numpy(), rtol=1e-12)
    np.testing.assert_allclose(std, pixels.std(1, correction=0).numpy(), rtol=1e-9)
    stream = load_image_folder(root, progress=False, max_memory_bytes=0)
    np.testing.assert_allclose(channel_statistics(stream), (mean, std), rtol=1e-9)
    sample = channel_statistics(stream, max_images=3, seed=1)
    assert sample == channel_statistics(stream, max_images=3, seed=1) != (mean, std)
    assert sample != channel_statistics(stream, max_images=3, seed=2)
    with pytest.raises(TypeError, match="InMemoryDataset or an ImageFileDataset"):
        channel_statistics([1, 2])
    with pytest.raises(ValueError, match="empty"):
        channel_statistics(memory.subset(slice(0, 0)))


def test_normalized(tmp_path):
    root = class_folder(tmp_path, {"a": 3, "b": 3}, size=(6, 6))
    memory = load_image_folder(root, progress=False)
    mean, std = channel_statistics(memory)
    result = normalized(memory, mean, std)
    expected = (memory.data - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(result.data, expected)
    assert result.mean == pytest.approx(mean) and result.std == pytest.approx(std)
    assert result.paths == memory.paths and result.classes == memory.classes and result.image_size == 6
    assert memory.mean == (0.0,) * 3  # the source is left as it was
    stream = load_image_folder(root, progress=False, max_memory_bytes=0)
    flip = lambda image: image.flip(-1)  # noqa: E731 - a transform of the dataset's own, applied after
    stream.transform = flip
    streamed = normalized(stream, mean, std)
    assert stream.transform is flip and streamed.mean == result.mean and streamed.paths == stream.paths
    for k in (0, 5):
        torch.testing.assert_close(streamed[k][0], result.data[k].flip(-1))
    torch.testing.assert_close(normalized(memory, 0.5, 0.25).data, (memory.data - 0.5) / 0.25)
    with pytest.raises(ValueError, match="already normalised"):
        normalized(result, mean, std)
    with pytest.raises(ValueError, match="mean needs 1 or 3 values"):
        normalized(memory, (0.1, 0.2), std)
    flat = class_folder(tmp_path / "flat", {"a": 1, "b": 1}, size=(4, 4))
    Image.new("RGB", (4, 4), (10, 20, 30)).save(os.path.join(flat, "a", "0.png"))
    Image.new("RGB", (4, 4), (10, 25, 30)).save(os.path.join(flat, "b", "0.png"))
    constant = load_image_folder(flat, progress=False)
    with pytest.raises(ValueError, match="std must be positive in every channel.*channel 0"):
        normalized(constant, *channel_statistics(constant))
    with pytest.raises(TypeError, match="InMemoryDataset or an ImageFileDataset"):
        normalized([1], 0, 1)


def test_export_image_folder_writes_what_load_image_folder_reads_back(tmp_path):
    write_idx_fixture(tmp_path / "data", 20, 10)
    written = image_folders.export_image_folder("fashion-mnist", tmp_path / "png", root=tmp_path / "data",
                                                progress=False)
    train = known_datasets.load_dataset("fashion-mnist", root=tmp_path / "data", train=True)
    test = known_datasets.load_dataset("fashion-mnist", root=tmp_path / "data", train=False)
    assert written == len(train) + len(test)
    folder = image_folders.load_image_folder(tmp_path / "png", progress=False)
    assert folder.classes == sorted(name.replace("/", "-") for name in train.classes)
    first = folder.paths.index(str(tmp_path / "png" / train.classes[int(train.targets[0])] / "train-00000.png"))
    assert torch.equal((folder.data[first, 0] * 255).round().to(torch.uint8), torch.as_tensor(train.data[0]))
