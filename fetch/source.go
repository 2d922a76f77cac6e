// Package fetch brings an overlay's bytes to the cloudlet: sources (HTTP(S)
// with Range, local files), the streamer that pulls segments in overlay
// order, the demand scheduler that lets a waiting read jump ahead of it,
// retries, verification, and the chunk cache. It knows nothing of FUSE; the
// file system asks it for chunks.
package fetch

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/cloudletfs/cloudletfs/overlay"
)

// Source reads byte ranges of one overlay file.
type Source interface {
	// ReadRange returns exactly n bytes at off.
	ReadRange(ctx context.Context, off, n int64) ([]byte, error)
	// Size is the file's length, or -1 if not yet known.
	Size() int64
	String() string
	// Close releases the file or connections.
	Close() error
}

// ErrNoRange is returned by a server that answers a Range request with the
// whole file.
var ErrNoRange = errors.New("the server ignores Range requests; cloudletfs needs one that honours them (any static file server, CDN or S3-compatible store does)")

// Redact returns ref fit to show: a URL's password replaced by xxxxx. A
// URL that does not parse (a password with a slash, say) loses everything
// between its scheme and its last @.
func Redact(ref string) string {
	u, err := url.Parse(ref)
	if err == nil {
		if u.User != nil {
			return u.Redacted()
		}
		return ref
	}
	scheme, rest, ok := strings.Cut(ref, "://")
	if at := strings.LastIndex(rest, "@"); ok && at >= 0 {
		return scheme + "://xxxxx" + rest[at:]
	}
	return ref
}

// OpenSource returns the source for an http(s):// URL, a file:// URL or a
// path. header is sent with every HTTP request (credentials, say); it never
// appears in errors or logs, and neither do credentials in the URL.
func OpenSource(ref string, client *http.Client, header http.Header) (Source, error) {
	u, err := url.Parse(ref)
	if err != nil && strings.Contains(ref, "://") {
		// The parser's message would repeat the URL, password and all.
		return nil, fmt.Errorf("overlay %s: not a valid URL (a password with / ? # or a space must be percent-encoded)", Redact(ref))
	}
	if err == nil && (u.Scheme == "http" || u.Scheme == "https") {
		if client == nil {
			client = DefaultClient(nil)
		}
		h := &HTTPSource{url: ref, shown: u.Redacted(), client: client, header: header}
		h.size.Store(-1)
		return h, nil
	}
	path := ref
	if err == nil && u.Scheme == "file" {
		path = u.Path
	} else if err == nil && u.Scheme != "" && len(u.Scheme) > 1 {
		return nil, fmt.Errorf("overlay %s: unsupported scheme %q: use http://, https://, file:// or a path", Redact(ref), u.Scheme)
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("overlay: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("overlay %s: %w", path, err)
	}
	return &FileSource{f: f, size: st.Size()}, nil
}

// DefaultClient bounds connection set-up and waiting for headers; bodies
// are bounded by each request's context. tlsConfig may add trusted roots.
func DefaultClient(tlsConfig *tls.Config) *http.Client {
	return &http.Client{Transport: &http.Transport{
		TLSClientConfig:       tlsConfig,
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		TLSHandshakeTimeout:   5 * time.Second,
		ResponseHeaderTimeout: 15 * time.Second,
		MaxIdleConnsPerHost:   8,
		IdleConnTimeout:       60 * time.Second,
	}}
}

// Close drops idle connections.
func (h *HTTPSource) Close() error {
	h.client.CloseIdleConnections()
	return nil
}

// HTTPSource reads ranges with HTTP Range requests.
type HTTPSource struct {
	url    string
	shown  string // the URL without credentials, for messages
	header http.Header
	client *http.Client
	size   atomic.Int64 // from Content-Range; -1 until the first response
}

func (h *HTTPSource) String() string { return h.shown }

// Size returns the file length the server reported, or -1 before any read.
func (h *HTTPSource) Size() int64 { return h.size.Load() }

// ReadRange fetches [off, off+n) and insists on a 206 whose Content-Range
// matches.
func (h *HTTPSource) ReadRange(ctx context.Context, off, n int64) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, h.url, nil)
	if err != nil {
		return nil, err
	}
	for k, vs := range h.header {
		req.Header[k] = vs
	}
	req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", off, off+n-1))
	resp, err := h.client.Do(req)
	if err != nil {
		// The error names the URL as given; name it without credentials.
		var ue *url.Error
		if errors.As(err, &ue) {
			return nil, fmt.Errorf("%s: %w", h.shown, ue.Err)
		}
		return nil, err
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusPartialContent:
	case http.StatusOK:
		return nil, ErrNoRange
	case http.StatusUnauthorized, http.StatusForbidden:
		return nil, fmt.Errorf("HTTP %s: the server wants credentials (--header 'Authorization: Bearer ...')", resp.Status)
	case http.StatusRequestedRangeNotSatisfiable:
		return nil, fmt.Errorf("bytes %d-%d are beyond the end of the file: the overlay is truncated", off, off+n-1)
	default:
		return nil, fmt.Errorf("HTTP %s", resp.Status)
	}
	first, last, total, err := parseContentRange(resp.Header.Get("Content-Range"))
	if err != nil {
		return nil, err
	}
	if first != off || last != off+n-1 {
		return nil, fmt.Errorf("asked for bytes %d-%d, got %d-%d", off, off+n-1, first, last)
	}
	if total >= 0 {
		h.size.Store(total)
	}
	buf := make([]byte, n)
	if _, err := io.ReadFull(resp.Body, buf); err != nil {
		return nil, fmt.Errorf("reading bytes %d-%d: %w", off, off+n-1, err)
	}
	return buf, nil
}

// parseContentRange parses "bytes FIRST-LAST/TOTAL"; TOTAL may be "*" (-1).
func parseContentRange(v string) (first, last, total int64, err error) {
	bad := fmt.Errorf("bad Content-Range %q", v)
	rest, ok := strings.CutPrefix(v, "bytes ")
	if !ok {
		return 0, 0, 0, bad
	}
	span, tot, ok := strings.Cut(rest, "/")
	if !ok {
		return 0, 0, 0, bad
	}
	a, b, ok := strings.Cut(span, "-")
	if !ok {
		return 0, 0, 0, bad
	}
	if first, err = strconv.ParseInt(a, 10, 64); err != nil || first < 0 {
		return 0, 0, 0, bad
	}
	if last, err = strconv.ParseInt(b, 10, 64); err != nil || last < first {
		return 0, 0, 0, bad
	}
	total = -1
	if tot != "*" {
		if total, err = strconv.ParseInt(tot, 10, 64); err != nil || total <= last {
			return 0, 0, 0, bad
		}
	}
	return first, last, total, nil
}

// FileSource reads a local overlay file.
type FileSource struct {
	f    *os.File
	size int64
}

func (s *FileSource) String() string { return s.f.Name() }

// Size returns the file's length.
func (s *FileSource) Size() int64 { return s.size }

// ReadRange reads [off, off+n) from the file.
func (s *FileSource) ReadRange(_ context.Context, off, n int64) ([]byte, error) {
	buf := make([]byte, n)
	if m, err := s.f.ReadAt(buf, off); m < len(buf) {
		if err == io.EOF || err == nil {
			return nil, fmt.Errorf("bytes %d-%d are beyond the end of the file: the overlay is truncated", off, off+n-1)
		}
		return nil, err
	}
	return buf, nil
}

// Close closes the file.
func (s *FileSource) Close() error { return s.f.Close() }

// OpenOverlay fetches and verifies an overlay's metadata (header, manifest,
// state, vm.json) with two reads: the header, then the rest of the metadata.
func OpenOverlay(ctx context.Context, src Source) (*overlay.Overlay, error) {
	hb, err := src.ReadRange(ctx, 0, overlay.HeaderSize)
	if err != nil {
		return nil, fmt.Errorf("overlay %s: header: %w", src, err)
	}
	h, err := overlay.UnmarshalHeader(hb)
	if err != nil {
		return nil, fmt.Errorf("overlay %s: %w", src, err)
	}
	meta := hb
	if rest := h.MetadataLen() - overlay.HeaderSize; rest > 0 {
		b, err := src.ReadRange(ctx, overlay.HeaderSize, rest)
		if err != nil {
			return nil, fmt.Errorf("overlay %s: metadata: %w", src, err)
		}
		meta = append(hb, b...)
	}
	o, err := overlay.Open(bytes.NewReader(meta), src.Size())
	if err != nil {
		return nil, fmt.Errorf("overlay %s: %w", src, err)
	}
	return o, nil
}

// TLSConfig trusts the system roots plus the PEM certificates in caFile,
// if given.
func TLSConfig(caFile string) (*tls.Config, error) {
	if caFile == "" {
		return nil, nil
	}
	pool, err := x509.SystemCertPool()
	if err != nil {
		pool = x509.NewCertPool()
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("--ca-cert: %w", err)
	}
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("--ca-cert %s: no PEM certificate in it", caFile)
	}
	return &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}, nil
}

// ParseHeaders turns "Name: value" strings into a header.
func ParseHeaders(lines []string) (http.Header, error) {
	h := http.Header{}
	for _, l := range lines {
		k, v, ok := strings.Cut(l, ":")
		if !ok || strings.TrimSpace(k) == "" {
			// The line may hold a secret: do not echo it.
			return nil, fmt.Errorf("--header: want \"Name: value\", got a line without a name and a colon")
		}
		h.Add(strings.TrimSpace(k), strings.TrimSpace(v))
	}
	return h, nil
}
