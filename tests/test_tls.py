"""The notebook's certificate: made once per cluster, kept, replaced only for a reason given."""

from __future__ import annotations

import stat

from cryptography import x509

from globular.ipcluster.tls import kept_certificate, make_certificate


def test_certificate_names_the_address_and_is_kept(tmp_path):
    first = kept_certificate(tmp_path / "tls", "198.18.0.11")
    assert not first.reused and not first.note
    cert = x509.load_pem_x509_certificate(first.cert)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(a) for a in names.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "198.18.0.11"}
    assert stat.S_IMODE((tmp_path / "tls" / "key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "tls").stat().st_mode) == 0o700

    again = kept_certificate(tmp_path / "tls", "198.18.0.11")
    assert again.reused and again.cert == first.cert and again.fingerprint == first.fingerprint


def test_kept_certificate_is_replaced_with_the_reason(tmp_path):
    folder = tmp_path / "tls"
    first = kept_certificate(folder, "198.18.0.11")
    moved = kept_certificate(folder, "198.18.0.12")  # the master has another address now
    assert not moved.reused and "does not name 198.18.0.12" in moved.note and moved.cert != first.cert

    (folder / "key.pem").unlink()
    lost = kept_certificate(folder, "198.18.0.12")
    assert not lost.reused and "key.pem is missing" in lost.note
    assert (folder / "key.pem").exists()

    (folder / "key.pem").write_bytes(make_certificate("x").key)  # a key of another certificate
    mismatched = kept_certificate(folder, "198.18.0.12")
    assert "its key does not belong to it" in mismatched.note

    (folder / "cert.pem").write_text("garbage")
    broken = kept_certificate(folder, "198.18.0.12")
    assert "cannot be read" in broken.note
    assert kept_certificate(folder, "198.18.0.12").reused
