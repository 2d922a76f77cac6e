// Package serve is cloudletfs's overlay server: a static HTTP server with
// Range support for the files of one directory, with an emulated network
// link in front of it. The link is one token bucket shared by every
// connection, like a single access link, plus one round trip of delay per
// request. Any static server or CDN can serve overlays; this one exists to
// measure early start on a known link.
//
// A Link emulates such a link for any TCP stream, not only HTTP: it relays
// connections to a target through one token bucket per direction, shared
// by every connection, and delays each direction by half the round trip.
package serve

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"path"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/time/rate"
)

// Options configure a Server.
type Options struct {
	// Rate is the link's capacity in bytes per second; 0 means unlimited.
	Rate float64
	// RTT delays each request before its first byte.
	RTT time.Duration
	Log zerolog.Logger
	// OnRequest, if set, is called after every request; tests use it to see
	// the order of requests.
	OnRequest func(Request)
	// Token, if set, is the bearer token every request must carry.
	Token string
}

// Request describes one served request, as logged.
type Request struct {
	Path     string
	Range    string // the Range header, empty if none
	Status   int
	Bytes    int64
	Duration time.Duration
}

// Server serves the files under one directory.
type Server struct {
	root   *os.Root
	opt    Options
	bucket *rate.Limiter
}

// burst is the token bucket's depth and the largest write that waits on it.
const burst = 16 << 10

// New serves dir. Paths can never reach outside dir: not with "..", not
// encoded, not through symbolic links.
func New(dir string, opt Options) (*Server, error) {
	st, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("serve: %w", err)
	}
	if !st.IsDir() {
		return nil, fmt.Errorf("serve: %s is not a directory", dir)
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return nil, fmt.Errorf("serve: %w", err)
	}
	return &Server{root: root, opt: opt, bucket: newBucket(opt.Rate)}, nil
}

// newBucket is the token bucket of a link of bps bytes per second, or nil
// for an unlimited link.
func newBucket(bps float64) *rate.Limiter {
	if bps <= 0 {
		return nil
	}
	return rate.NewLimiter(rate.Limit(bps), burst)
}

// Close releases the directory.
func (s *Server) Close() error { return s.root.Close() }

// ServeHTTP serves GET and HEAD of regular files, with Range support.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	cw := &countingWriter{ResponseWriter: w, ctx: r.Context(), bucket: s.bucket, status: http.StatusOK}
	s.serve(cw, r)
	req := Request{Path: r.URL.Path, Range: r.Header.Get("Range"), Status: cw.status, Bytes: cw.n.Load(), Duration: time.Since(start)}
	s.opt.Log.Info().Str("path", req.Path).Str("range", req.Range).Int("status", req.Status).
		Int64("bytes", req.Bytes).Str("took", req.Duration.Round(time.Microsecond).String()).Msg("request")
	if s.opt.OnRequest != nil {
		s.opt.OnRequest(req)
	}
}

func (s *Server) serve(w *countingWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	if s.opt.Token != "" {
		got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok || subtle.ConstantTimeCompare([]byte(got), []byte(s.opt.Token)) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="cloudletfs"`)
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
	}
	if s.opt.RTT > 0 {
		select {
		case <-time.After(s.opt.RTT):
		case <-r.Context().Done():
			return
		}
	}
	name := strings.TrimPrefix(path.Clean("/"+r.URL.Path), "/")
	if name == "" {
		name = "."
	}
	f, err := s.root.Open(name)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			http.Error(w, "not found", http.StatusNotFound)
		} else {
			http.Error(w, "forbidden", http.StatusForbidden)
		}
		return
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil || !st.Mode().IsRegular() {
		http.Error(w, "not found", http.StatusNotFound)
		return
	}
	w.Header().Set("Accept-Ranges", "bytes")
	http.ServeContent(w, r, name, st.ModTime(), f)
}

// countingWriter counts the body bytes and paces them through the bucket.
type countingWriter struct {
	http.ResponseWriter
	ctx    context.Context
	bucket *rate.Limiter
	status int
	n      atomic.Int64
}

func (c *countingWriter) WriteHeader(code int) {
	c.status = code
	c.ResponseWriter.WriteHeader(code)
}

func (c *countingWriter) Write(p []byte) (int, error) {
	written := 0
	for len(p) > 0 {
		n := min(len(p), burst)
		if c.bucket != nil {
			if err := c.bucket.WaitN(c.ctx, n); err != nil {
				return written, err
			}
		}
		m, err := c.ResponseWriter.Write(p[:n])
		written += m
		c.n.Add(int64(m))
		if err != nil {
			return written, err
		}
		p = p[n:]
		if c.bucket != nil {
			// Push each paced piece out now, so the link's pace is what
			// the client sees rather than bursts of buffered bytes.
			if f, ok := c.ResponseWriter.(http.Flusher); ok {
				f.Flush()
			}
		}
	}
	return written, nil
}

// ParseRate parses a link rate such as "38mbit", "100Mbit", "1gbit",
// "500kbit" or "2MB" (bytes) into bytes per second. "0" or "" means
// unlimited.
func ParseRate(s string) (float64, error) {
	t := strings.ToLower(strings.TrimSpace(s))
	if t == "" || t == "0" {
		return 0, nil
	}
	units := []struct {
		suffix string
		mult   float64
	}{
		{"gbit", 1e9 / 8}, {"mbit", 1e6 / 8}, {"kbit", 1e3 / 8}, {"bit", 1.0 / 8},
		{"gb", 1e9}, {"mb", 1e6}, {"kb", 1e3}, {"b", 1},
	}
	for _, u := range units {
		if strings.HasSuffix(t, u.suffix) {
			v, err := strconv.ParseFloat(strings.TrimSpace(strings.TrimSuffix(t, u.suffix)), 64)
			if err != nil || v < 0 {
				break
			}
			return v * u.mult, nil
		}
	}
	return 0, fmt.Errorf("rate %q: want a number with a unit, such as 38mbit, 1gbit or 5MB (bytes per second)", s)
}
