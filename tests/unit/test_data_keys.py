import pytest

from moce_ds.data.keys import key_index, make_key


def test_round_trip():
    for i, dom in [(0, "digits"), (7, "faces"), (12345678, "a_b9"), (10**9, "x")]:
        key = make_key(i, dom)
        assert "." not in key
        assert key.startswith(dom + "-")
        assert key_index(key) == i
    assert make_key(42, "photos") == "photos-00000042"


@pytest.mark.parametrize("domain", ["Faces", "a.b", "a-b", "", "ü"])
def test_bad_domain_rejected(domain):
    with pytest.raises(ValueError, match="domain"):
        make_key(1, domain)


def test_bad_index_rejected():
    with pytest.raises(ValueError):
        make_key(-1, "digits")


@pytest.mark.parametrize("key", ["digits", "digits-", "digits-12a", "digits.00000001", "-0001", "Digits-0001"])
def test_malformed_key_names_key(key):
    with pytest.raises(ValueError) as e:
        key_index(key)
    assert repr(key) in str(e.value)
