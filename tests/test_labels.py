import numpy as np
import pytest

from cxrtune.data.labels import SCHEMES, apply_scheme, audit_scheme
from cxrtune.data.manifest import Record
from cxrtune.errors import ConfigError, DataError


def recs(**counts):
    out = []
    for label, n in counts.items():
        out += [Record(path=f"/d/{label}{i}.png", label=label) for i in range(n)]
    return out


def test_three_class_merges_fine_labels_and_reports_drops():
    r = recs(normal=5, bacterial=5, streptococcus=5, viral=5, covid=4, sars=4, stress_smoking=2, ards=2)
    out = apply_scheme(r, SCHEMES.get("three_class"), min_class_count=3)
    counts = {c: out.targets.count(c) for c in ("normal", "bacterial", "viral")}
    # ards (2 images) is part of viral (15 images): the threshold is on the task class.
    assert counts == {"normal": 5, "bacterial": 10, "viral": 15}
    assert out.dropped == {"stress_smoking": (2, "not part of task 'three_class'")}
    assert "stress_smoking" not in {x.label for x in out.records}


def test_min_class_count_applies_to_task_classes_not_fine_labels():
    # Few images: 2 viral and 2 COVID-19 of 40 pneumonia images. Binary keeps them all.
    r = recs(normal=20, bacterial=36, viral=2, covid=2)
    binary = apply_scheme(r, SCHEMES.get("binary"), min_class_count=3)
    assert binary.targets.count("pneumonia") == 40 and binary.dropped == {}
    three = apply_scheme(r, SCHEMES.get("three_class"), min_class_count=3)
    assert three.targets.count("viral") == 4 and three.dropped == {}


def test_task_class_below_min_class_count_is_reported_with_a_correct_fix():
    r = recs(normal=9, bacterial=9, viral=9, covid=2)
    with pytest.raises(DataError) as e:
        apply_scheme(r, SCHEMES.get("four_class"), min_class_count=3)
    msg = str(e.value)
    assert "covid (2)" in msg and "min_class_count=3" in msg
    assert "--min-class-count 2" in msg and "data.min_class_count: 2" in msg
    assert "--task " in msg and "three_class" in msg  # tasks that fit, never the task itself
    assert "four_class" not in msg.split("fix:")[1]
    out = audit_scheme(r, SCHEMES.get("four_class"), min_class_count=3)
    assert out.problems and out.dropped["covid"] == (2, "task class 'covid' has only 2 image(s), "
                                                          "fewer than min_class_count=3")
    assert out.dropped["covid"][1] != "not part of task 'four_class'"


def test_no_suggestion_of_the_task_already_chosen():
    with pytest.raises(DataError) as e:
        apply_scheme(recs(normal=5), SCHEMES.get("binary"))
    assert "binary" not in str(e.value).split("fix:")[1]


def test_four_class_keeps_covid_apart_and_binary_merges_all():
    r = recs(normal=3, bacterial=3, viral=3, covid=3)
    four = apply_scheme(r, SCHEMES.get("four_class"))
    assert four.targets.count("covid") == 3 and four.targets.count("viral") == 3
    binary = apply_scheme(r, SCHEMES.get("binary"))
    assert binary.targets.count("pneumonia") == 9


def test_unmapped_fine_label_is_dropped_with_reason():
    out = apply_scheme(recs(normal=3, viral=3, bacterial=3, lung_opacity=7), SCHEMES.get("three_class"))
    assert out.dropped == {"lung_opacity": (7, "not part of task 'three_class'")}


def test_empty_class_after_filtering_is_an_error():
    with pytest.raises(DataError, match=r"no images for class\(es\) covid"):
        apply_scheme(recs(normal=3, viral=3, bacterial=3), SCHEMES.get("four_class"), source="kermany")


def test_multi_to_binary_probabilities_sum():
    scheme = SCHEMES.get("multi_to_binary")
    probs = np.random.default_rng(0).dirichlet(np.ones(3), size=20)
    b = scheme.to_binary_probs(probs)
    assert b.shape == (20, 2)
    np.testing.assert_allclose(b.sum(1), 1.0)
    np.testing.assert_allclose(b[:, 0], probs[:, scheme.index_of("normal")])
    with pytest.raises(ValueError):
        SCHEMES.get("three_class").binary_matrix()


def test_unknown_task_lists_valid_names():
    with pytest.raises(ConfigError, match="unknown task 'five_class'.*binary, four_class, multi_to_binary, three_class"):
        SCHEMES.get("five_class")
