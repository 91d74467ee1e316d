"""Reference batches (cl/strategies/refdata.py) and the teacher cache (parts.TeacherCache):
decoding in a thread pool gives the batches of one thread; the cached teacher
features are what recomputing them gives; a random transform disables the cache."""
import pytest
import torch
from PIL import Image

from mgcl.cl.strategies import create
from mgcl.cl.strategies.parts import TeacherCache, teacher_features
from mgcl.cl.strategies.primed import Primed
from mgcl.cl.strategies.refdata import ReferencePairs, is_deterministic, reference_batches
from test_cl_strategies import bank, run, siphon_for, tasks, tiny_model  # noqa: F401 - fixtures

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def photo_rows(tmp_path_factory):
    """Reference rows over 20 JPEG files of 320 x 240 (decoded and resized per item)."""
    root = tmp_path_factory.mktemp("photos")
    g = torch.Generator().manual_seed(5)
    rows = []
    for i in range(20):
        arr = (torch.rand(240, 320, 3, generator=g) * 255).to(torch.uint8).numpy()
        path = root / f"{i}.jpg"
        Image.fromarray(arr).save(path, quality=90)
        rows.append({"id": f"r{i}", "index": i, "image": str(path), "caption": f"a red circle {i}",
                     "level": ["task", "domain", "general"][i % 3]})
    return rows


def test_thread_pool_decoding_gives_the_same_batches(tasks, photo_rows):
    m = tiny_model(tasks)
    pairs = ReferencePairs(photo_rows, m.transform(False), {"task": 2.0})
    one, many = (reference_batches(pairs, m.tokenize, 6, seed=7, workers=w) for w in (0, 4))
    for _ in range(7):  # two passes and a bit: the reshuffle of pass k seeded 7 + k
        a, b = next(one), next(many)
        assert torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens)
        assert torch.equal(a.weights, b.weights) and torch.equal(a.index, b.index)
    order = torch.randperm(20, generator=torch.Generator().manual_seed(7)).tolist()
    first = next(reference_batches(pairs, m.tokenize, 6, seed=7, workers=3))
    assert first.index.tolist() == order[:6]
    assert torch.equal(first.images[2], pairs[order[2]][0])
    with pytest.raises(ValueError, match="workers must be"):
        next(reference_batches(pairs, m.tokenize, 6, seed=7, workers=-1))


def test_a_bad_image_is_named_from_a_worker_thread(tasks, photo_rows, tmp_path):
    m = tiny_model(tasks)
    rows = [dict(r) for r in photo_rows[:8]]
    rows[5]["image"] = str(tmp_path / "missing.jpg")
    stream = reference_batches(ReferencePairs(rows, m.transform(False)), m.tokenize, 8, seed=0, workers=4)
    with pytest.raises(ValueError, match="reference pair 'r5' .*cannot open image"):
        next(stream)


def test_which_transforms_are_deterministic(tasks):
    from open_clip.transform import image_transform
    from torchvision import transforms as T

    m = tiny_model(tasks)
    assert is_deterministic(m.transform(False)) and not is_deterministic(m.transform(True))
    assert is_deterministic(image_transform(32, is_train=False))
    assert not is_deterministic(image_transform(32, is_train=True))
    assert is_deterministic(image_transform(32, is_train=False, resize_mode="longest"))
    assert not is_deterministic(T.Compose([T.Resize(8), T.Lambda(lambda x: x)])), "an unknown callable is random"
    assert not is_deterministic(T.Compose([T.Resize(8), T.ColorJitter(0.1)]))

    class Fixed:
        deterministic = True

        def __call__(self, x):
            return x

    assert is_deterministic(T.Compose([Fixed(), T.CenterCrop(8)]))


def test_cached_teacher_features_are_what_recomputing_gives(tasks, photo_rows):
    """Across passes (each reshuffled) the cache returns the features a teacher
    forward of that very batch gives; after the first pass it runs the teacher no more."""
    m = tiny_model(tasks).eval()
    pairs = ReferencePairs(photo_rows, m.transform(False))
    calls = []

    class Counting(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.logit_scale = inner, inner.logit_scale

        def encode_image(self, x):
            calls.append(len(x))
            return self.inner.encode_image(x)

        def encode_text(self, t):
            return self.inner.encode_text(t)

    teacher = Counting(m)
    cache = TeacherCache(len(pairs))
    stream = reference_batches(pairs, m.tokenize, 6, seed=1, workers=2)  # 3 batches a pass, 2 pairs dropped
    for step in range(12):
        ref = next(stream)
        img, txt = cache.features(teacher, ref.index, ref.images, ref.tokens)
        want_img, want_txt = teacher_features(m, ref.images, ref.tokens)
        torch.testing.assert_close(img, want_img, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(txt, want_txt, rtol=1e-5, atol=1e-6)
        assert img.dtype == torch.float32 and img.shape == (6, 16)
    assert sum(calls) == 20, f"each pair through the teacher once, got {calls}"
    assert calls[:3] == [6, 6, 6], "the first pass runs the teacher on whole batches, as without the cache"


def _spy(record):
    class Spy(Primed):
        def before_task(self, trainer, t):
            super().before_task(trainer, t)
            record.append(self.reference.cache)
    return Spy


def test_a_primed_run_with_the_cache_equals_one_without(tasks, bank, tmp_path):
    caches, results = [], {}
    for on in (True, False):
        st = _spy(caches)(siphon=siphon_for(bank), ref_batch_size=6, prefetch=0)
        st.reference.cache_teacher = on
        model = tiny_model(tasks)
        results[on] = run(model, st, tasks, tmp_path / str(on))
        results[on]["weights"] = [p.detach().clone() for p in model.parameters()]
    assert all(isinstance(c, TeacherCache) for c in caches[:2]) and caches[2:] == [None, None]
    for a, b in zip(results[True]["weights"], results[False]["weights"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    R = [sum(results[on]["methods"]["primed"]["R"], []) for on in (True, False)]
    assert R[0] == pytest.approx(R[1], abs=1e-9)


def test_a_random_reference_transform_disables_the_cache(tasks, bank, tmp_path):
    from torchvision import transforms as T

    caches = []
    model = tiny_model(tasks)
    jitter = T.Compose([model.transform(False), T.RandomHorizontalFlip()])
    model.transform = lambda train, base=model.transform: base(True) if train else jitter
    run(model, _spy(caches)(siphon=siphon_for(bank), ref_batch_size=6), tasks, tmp_path)
    assert caches == [None, None]

    class Ready(torch.utils.data.Dataset):  # a dataset of ready pairs: cached only when it says it is fixed
        def __init__(self, deterministic=None):
            g = torch.Generator().manual_seed(0)
            self.images = torch.randn(8, 3, 32, 32, generator=g)
            if deterministic is not None:
                self.deterministic = deterministic

        def __len__(self):
            return 8

        def __getitem__(self, i):
            return self.images[i], "a red circle", 1.0

    class Fixed:
        def __init__(self, refset):
            self.refset = refset

        def reference_set(self, finished, stages="multi-stage"):
            return self.refset

    for flag, want in ((None, None), (False, None), (True, TeacherCache)):
        caches.clear()
        run(tiny_model(tasks), _spy(caches)(siphon=Fixed(Ready(flag)), ref_batch_size=4), tasks, tmp_path / str(flag))
        assert [type(c) if c is not None else None for c in caches] == [want, want]


def test_create_keeps_the_cache_on_by_default(bank):
    st = create("primed", siphon=siphon_for(bank))
    assert st.reference.cache_teacher is True
