package main

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	upstreamauthorityv1 "gohost/pb/spire/plugin/server/upstreamauthority/v1"
	typespb "gohost/pb/spire/plugin/types"
)

// allowedCAKeyUsages are the only key usages SPIRE accepts on the minted CA.
const allowedCAKeyUsages = x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature

// mintAndCheck sends a SPIRE-shaped CSR to MintX509CAAndSubscribe, checks the first response the
// way SPIRE validates an upstream-minted CA, then cancels the stream as SPIRE does at its next
// mint. When outDir is set, it first writes the received certificates there as PEM files. It
// returns a description of the minted CA.
func (s *pluginSession) mintAndCheck(ctx context.Context, trustDomain string, preferredTTL int32, outDir string) (string, error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", fmt.Errorf("generating the P-256 CA key: %w", err)
	}
	csr, err := newCACSR(caKey, trustDomain)
	if err != nil {
		return "", err
	}

	streamCtx, cancel := context.WithCancel(ctx)
	defer cancel()

	request := &upstreamauthorityv1.MintX509CARequest{Csr: csr, PreferredTtl: preferredTTL}
	stream, err := upstreamauthorityv1.NewUpstreamAuthorityClient(s.conn).MintX509CAAndSubscribe(streamCtx, request)
	if err != nil {
		return "", fmt.Errorf("MintX509CAAndSubscribe failed: %w", err)
	}
	response, err := stream.Recv()
	if errors.Is(err, io.EOF) {
		return "", errors.New("MintX509CAAndSubscribe: the plugin closed the stream before the first response")
	}
	if err != nil {
		return "", fmt.Errorf("MintX509CAAndSubscribe: receiving the first response failed: %w", err)
	}

	if outDir != "" {
		if err := writeResponse(outDir, response); err != nil {
			return "", err
		}
	}

	chain, err := parseCertificates("x509_ca_chain", response.GetX509CaChain())
	if err != nil {
		return "", err
	}
	roots, err := parseCertificates("upstream_x509_roots", response.GetUpstreamX509Roots())
	if err != nil {
		return "", err
	}

	now := time.Now()
	ca := chain[0]
	if err := checkMintedCA(ca, caKey.Public(), trustDomain, now); err != nil {
		return "", err
	}
	if err := checkChainOrder(chain); err != nil {
		return "", err
	}
	if err := verifyThroughThrowawayLeaf(caKey, chain, roots, trustDomain, now); err != nil {
		return "", err
	}

	return fmt.Sprintf("CA serial %x valid until %s (chain of %d, %d roots)",
		ca.SerialNumber, ca.NotAfter.UTC().Format(time.RFC3339), len(chain), len(roots)), nil
}

// newCACSR builds a CSR shaped like the one SPIRE sends for a new X.509 CA: the subject
// C=US, O=SPIFFE with a fresh serialNumber attribute, and one URI SAN naming the trust domain.
func newCACSR(key *ecdsa.PrivateKey, trustDomain string) ([]byte, error) {
	subjectSerial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, fmt.Errorf("generating the subject serial number: %w", err)
	}

	template := &x509.CertificateRequest{
		Subject: pkix.Name{
			Country:      []string{"US"},
			Organization: []string{"SPIFFE"},
			SerialNumber: subjectSerial.String(),
		},
		URIs:               []*url.URL{trustDomainID(trustDomain)},
		SignatureAlgorithm: x509.ECDSAWithSHA256,
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, template, key)
	if err != nil {
		return nil, fmt.Errorf("creating the CSR for trust domain %q: %w", trustDomain, err)
	}
	return csr, nil
}

func trustDomainID(trustDomain string) *url.URL {
	return &url.URL{Scheme: "spiffe", Host: trustDomain}
}

func parseCertificates(field string, certificates []*typespb.X509Certificate) ([]*x509.Certificate, error) {
	if len(certificates) == 0 {
		return nil, fmt.Errorf("MintX509CAAndSubscribe: the first response has an empty %s", field)
	}

	parsed := make([]*x509.Certificate, 0, len(certificates))
	for i, certificate := range certificates {
		if len(certificate.GetAsn1()) == 0 {
			return nil, fmt.Errorf("MintX509CAAndSubscribe: %s[%d] has an empty asn1 field", field, i)
		}
		cert, err := x509.ParseCertificate(certificate.GetAsn1())
		if err != nil {
			return nil, fmt.Errorf("MintX509CAAndSubscribe: %s[%d] is not a valid DER certificate: %w", field, i, err)
		}
		parsed = append(parsed, cert)
	}
	return parsed, nil
}

// checkMintedCA applies SPIRE's checks on x509_ca_chain[0]: a currently valid CA with keyCertSign,
// no other key usage than cRLSign and digitalSignature, the CSR's public key, and either no URI
// SAN or exactly the trust domain ID.
func checkMintedCA(ca *x509.Certificate, csrKey crypto.PublicKey, trustDomain string, now time.Time) error {
	if !ca.BasicConstraintsValid || !ca.IsCA {
		return fmt.Errorf("x509_ca_chain[0] (subject %q) is not a CA: basic constraints valid=%v, CA=%v",
			ca.Subject, ca.BasicConstraintsValid, ca.IsCA)
	}
	if ca.KeyUsage&x509.KeyUsageCertSign == 0 {
		return fmt.Errorf("x509_ca_chain[0] lacks the keyCertSign key usage (key usage bits %#x)", int(ca.KeyUsage))
	}
	if extra := ca.KeyUsage &^ allowedCAKeyUsages; extra != 0 {
		return fmt.Errorf("x509_ca_chain[0] has key usage bits %#x beyond keyCertSign, cRLSign and digitalSignature, which SPIRE rejects", int(extra))
	}

	wantKey, err := x509.MarshalPKIXPublicKey(csrKey)
	if err != nil {
		return fmt.Errorf("encoding the CSR public key: %w", err)
	}
	gotKey, err := x509.MarshalPKIXPublicKey(ca.PublicKey)
	if err != nil {
		return fmt.Errorf("encoding the public key of x509_ca_chain[0]: %w", err)
	}
	if !bytes.Equal(gotKey, wantKey) {
		return errors.New("x509_ca_chain[0] does not carry the CSR's public key")
	}

	wantID := trustDomainID(trustDomain).String()
	switch {
	case len(ca.URIs) == 0:
	case len(ca.URIs) == 1 && ca.URIs[0].String() == wantID:
	default:
		return fmt.Errorf("x509_ca_chain[0] has URI SANs %v, but SPIRE accepts none or exactly %s", ca.URIs, wantID)
	}

	if now.Before(ca.NotBefore) || now.After(ca.NotAfter) {
		return fmt.Errorf("x509_ca_chain[0] is not valid now (%s): notBefore %s, notAfter %s",
			now.UTC().Format(time.RFC3339), ca.NotBefore.UTC().Format(time.RFC3339), ca.NotAfter.UTC().Format(time.RFC3339))
	}
	return nil
}

// checkChainOrder checks that x509_ca_chain runs from child to parent, because SPIRE ships it in
// that order after every SVID it issues.
func checkChainOrder(chain []*x509.Certificate) error {
	for i := 0; i+1 < len(chain); i++ {
		if err := chain[i].CheckSignatureFrom(chain[i+1]); err != nil {
			return fmt.Errorf("x509_ca_chain[%d] (subject %q) is not signed by x509_ca_chain[%d] (subject %q): %w",
				i, chain[i].Subject, i+1, chain[i+1].Subject, err)
		}
	}
	return nil
}

// verifyThroughThrowawayLeaf repeats SPIRE's acceptance test: it signs a short-lived leaf for
// spiffe://<trust domain>/spire/throwaway with the new CA key, then verifies leaf plus the whole
// x509_ca_chain against a pool made only of upstream_x509_roots.
func verifyThroughThrowawayLeaf(caKey *ecdsa.PrivateKey, chain, roots []*x509.Certificate, trustDomain string, now time.Time) error {
	leafKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("generating the throwaway leaf key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return fmt.Errorf("generating the throwaway leaf serial number: %w", err)
	}

	ca := chain[0]
	leafID := trustDomainID(trustDomain)
	leafID.Path = "/spire/throwaway"
	notAfter := now.Add(time.Minute)
	if notAfter.After(ca.NotAfter) {
		notAfter = ca.NotAfter
	}
	template := &x509.Certificate{
		SerialNumber:          serial,
		NotBefore:             now.Add(-10 * time.Second),
		NotAfter:              notAfter,
		URIs:                  []*url.URL{leafID},
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, template, ca, leafKey.Public(), caKey)
	if err != nil {
		return fmt.Errorf("signing a throwaway leaf under x509_ca_chain[0]: %w", err)
	}
	leaf, err := x509.ParseCertificate(leafDER)
	if err != nil {
		return fmt.Errorf("parsing the throwaway leaf: %w", err)
	}

	rootPool := x509.NewCertPool()
	for _, root := range roots {
		rootPool.AddCert(root)
	}
	intermediatePool := x509.NewCertPool()
	for _, cert := range chain {
		intermediatePool.AddCert(cert)
	}

	options := x509.VerifyOptions{
		Roots:         rootPool,
		Intermediates: intermediatePool,
		CurrentTime:   now,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	}
	if _, err := ca.Verify(options); err != nil {
		return fmt.Errorf("x509_ca_chain[0] does not verify through x509_ca_chain to upstream_x509_roots (roots: %s): %w",
			describeSubjects(roots), err)
	}
	verified, err := leaf.Verify(options)
	if err != nil {
		return fmt.Errorf("a leaf signed by x509_ca_chain[0] does not verify through x509_ca_chain to upstream_x509_roots (roots: %s): %w",
			describeSubjects(roots), err)
	}
	if len(verified) == 0 || len(verified[0]) < 2 || !bytes.Equal(verified[0][1].Raw, ca.Raw) {
		return errors.New("crypto/x509 built a verified path for the throwaway leaf that does not pass through x509_ca_chain[0]")
	}
	return nil
}

func describeSubjects(certs []*x509.Certificate) string {
	subjects := make([]string, 0, len(certs))
	for _, cert := range certs {
		subjects = append(subjects, fmt.Sprintf("%q", cert.Subject.String()))
	}
	return strings.Join(subjects, ", ")
}

// writeResponse writes x509_ca_chain.pem and upstream_x509_roots.pem into dir, one PEM block per
// received asn1 field, in the order received.
func writeResponse(dir string, response *upstreamauthorityv1.MintX509CAResponse) error {
	files := []struct {
		name         string
		certificates []*typespb.X509Certificate
	}{
		{"x509_ca_chain.pem", response.GetX509CaChain()},
		{"upstream_x509_roots.pem", response.GetUpstreamX509Roots()},
	}
	for _, file := range files {
		var text bytes.Buffer
		for _, certificate := range file.certificates {
			if err := pem.Encode(&text, &pem.Block{Type: "CERTIFICATE", Bytes: certificate.GetAsn1()}); err != nil {
				return fmt.Errorf("encoding %s: %w", file.name, err)
			}
		}
		path := filepath.Join(dir, file.name)
		if err := os.WriteFile(path, text.Bytes(), 0o644); err != nil {
			return fmt.Errorf("writing the received certificates: %w", err)
		}
	}
	return nil
}
