//! Certificates in a CA file that are not CAs (a server's own certificate, put there to pin it)
//! are trusted as themselves only, as OpenSSL does: the server presenting exactly that
//! certificate is accepted (name and dates checked), but the certificate's key cannot vouch for
//! any other. rustls takes every certificate of a root store as a trust anchor, whatever its
//! basic constraints say, so without this whoever holds one pinned server's key could
//! impersonate any host to the client.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use x509_parser::prelude::{FromDer, X509Certificate, X509Version};

/// Whether a certificate may issue others when it is a trust anchor: a version 1 certificate
/// (old roots have no extensions; OpenSSL takes them as CAs), or one whose basic constraints say
/// it is a CA and whose key usage, if any, allows signing certificates (RFC 5280 4.2.1.3, 4.2.1.9).
/// A certificate that cannot be parsed is not.
pub(crate) fn can_issue(cert: &CertificateDer<'_>) -> bool {
    let Ok((_, cert)) = X509Certificate::from_der(cert.as_ref()) else {
        return false;
    };
    if cert.version() == X509Version::V1 {
        return true;
    }
    let key_usage_allows = match cert.key_usage() {
        Ok(None) => true,
        Ok(Some(usage)) => usage.value.key_cert_sign(),
        Err(_) => false,
    };
    cert.is_ca() && key_usage_allows
}

/// Verifies against the CA roots, and accepts besides a server presenting one of the pinned
/// certificates itself.
#[derive(Debug)]
pub(crate) struct PinnedOrCa {
    /// None when there is no CA root at all (an empty system store and only pinned certificates).
    cas: Option<Arc<WebPkiServerVerifier>>,
    /// Each pinned certificate with a verifier whose only anchor it is: that checks the name,
    /// the dates and the self-signature as for any chain.
    pinned: Vec<(CertificateDer<'static>, Arc<WebPkiServerVerifier>)>,
    provider: Arc<CryptoProvider>,
}

impl PinnedOrCa {
    pub(crate) fn new(
        cas: Arc<RootCertStore>,
        pinned: Vec<CertificateDer<'static>>,
        provider: Arc<CryptoProvider>,
    ) -> Result<PinnedOrCa, rustls::Error> {
        let verifier = |roots: Arc<RootCertStore>| {
            WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))
        };
        let cas = if cas.is_empty() { None } else { Some(verifier(cas)?) };
        let pinned = pinned
            .into_iter()
            .map(|cert| {
                let mut alone = RootCertStore::empty();
                alone.add(cert.clone())?;
                Ok((cert, verifier(Arc::new(alone))?))
            })
            .collect::<Result<_, rustls::Error>>()?;
        Ok(PinnedOrCa { cas, pinned, provider })
    }
}

impl ServerCertVerifier for PinnedOrCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let by_cas = || match &self.cas {
            Some(cas) => cas.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now),
            None => Err(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)),
        };
        let Some((_, alone)) = self.pinned.iter().find(|(cert, _)| cert.as_ref() == end_entity.as_ref()) else {
            return by_cas();
        };
        // The pinned certificate itself, nothing else in the chain counts.
        let as_itself = alone.verify_server_cert(end_entity, &[], server_name, ocsp_response, now);
        if as_itself.is_ok() {
            return as_itself;
        }
        // Not valid as itself (one a CA issued, not self-signed): valid as any other, or the
        // reason it is not valid as itself.
        by_cas().or(as_itself)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};

    fn cert(is_ca: IsCa, key_usages: Vec<KeyUsagePurpose>) -> CertificateDer<'static> {
        let mut params = CertificateParams::new(vec!["pinned.test".to_string()]).unwrap();
        params.is_ca = is_ca;
        params.key_usages = key_usages;
        params.self_signed(&KeyPair::generate().unwrap()).unwrap().der().clone()
    }

    #[test]
    fn only_cas_allowed_to_sign_certificates_can_issue() {
        let ca = || IsCa::Ca(BasicConstraints::Unconstrained);
        assert!(can_issue(&cert(ca(), vec![])));
        assert!(can_issue(&cert(ca(), vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign])));
        // A CA whose key usage leaves out certificate signing.
        assert!(!can_issue(&cert(ca(), vec![KeyUsagePurpose::DigitalSignature])));
        // Server certificates: cA=FALSE said, or no basic constraints at all (RFC 5280 4.2.1.9).
        assert!(!can_issue(&cert(IsCa::ExplicitNoCa, vec![KeyUsagePurpose::DigitalSignature])));
        assert!(!can_issue(&cert(IsCa::NoCa, vec![])));
        assert!(!can_issue(&CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00])));
    }
}
