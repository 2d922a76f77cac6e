package serve

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"testing"
	"time"
)

// ioDeadline bounds every read and write of a test connection, so that a
// link that loses a byte or a FIN fails the test instead of hanging it.
const ioDeadline = 5 * time.Second

// startLink starts a target that runs serveConn on each connection it
// accepts, and a link to it on 127.0.0.1. Cleanup closes the link, checks
// that Serve returned nil, and waits for the target's handlers.
func startLink(t *testing.T, opt LinkOptions, serveConn func(*net.TCPConn)) *Link {
	t.Helper()
	tl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var handlers sync.WaitGroup
	go func() {
		for {
			c, err := tl.Accept()
			if err != nil {
				return
			}
			handlers.Go(func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(ioDeadline))
				serveConn(c.(*net.TCPConn))
			})
		}
	}()
	l := startLinkTo(t, tl.Addr().String(), opt)
	t.Cleanup(func() {
		tl.Close()
		handlers.Wait()
	})
	return l
}

// startLinkTo starts a link on 127.0.0.1 to target.
func startLinkTo(t *testing.T, target string, opt LinkOptions) *Link {
	t.Helper()
	ll, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := NewLink(ll, target, opt)
	served := make(chan error, 1)
	go func() { served <- l.Serve() }()
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if err := <-served; err != nil {
			t.Errorf("Serve after Close: %v", err)
		}
	})
	return l
}

// dialLink connects a client to the link.
func dialLink(t *testing.T, l *Link) *net.TCPConn {
	t.Helper()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(ioDeadline))
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// echo sends back what it reads, and half-closes at the client's EOF.
func echo(c *net.TCPConn) {
	if _, err := io.Copy(c, c); err == nil {
		c.CloseWrite()
	}
}

func randomBytes(t *testing.T, n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestLinkCarriesBytesBothWays: what three clients send at once comes
// back from an echoing target unchanged, through the delay line.
func TestLinkCarriesBytesBothWays(t *testing.T) {
	l := startLink(t, LinkOptions{RTT: 4 * time.Millisecond}, echo)
	var wg sync.WaitGroup
	for i := range 3 {
		c := dialLink(t, l)
		sent := randomBytes(t, 1<<20+i*4099)
		wg.Go(func() {
			werr := make(chan error, 1)
			go func() {
				_, err := c.Write(sent)
				if err == nil {
					err = c.CloseWrite()
				}
				werr <- err
			}()
			got, err := io.ReadAll(c)
			if err != nil {
				t.Errorf("client %d: read: %v", i, err)
			}
			if err := <-werr; err != nil {
				t.Errorf("client %d: write: %v", i, err)
			}
			if !bytes.Equal(got, sent) {
				t.Errorf("client %d: got %d bytes back, sent %d, and they differ", i, len(got), len(sent))
			}
		})
	}
	wg.Wait()
}

// TestLinkRateIsABound: two connections at once each send 512 KiB up and
// get 512 KiB down at 8 Mbit/s. Each direction carries 1 MiB through its
// bucket, shared by both connections, so neither can be done before the
// bucket's depth plus the rest at the rate: a bound the link cannot beat
// however fast the machine is.
func TestLinkRateIsABound(t *testing.T) {
	const (
		bps  = 1e6 // 8 Mbit/s
		each = 512 << 10
	)
	start := time.Now()
	var mu sync.Mutex
	var upDone time.Time // the last byte up arrived at the target
	down := randomBytes(t, each)
	l := startLink(t, LinkOptions{Rate: bps}, func(c *net.TCPConn) {
		werr := make(chan error, 1)
		go func() { _, err := c.Write(down); werr <- err }()
		n, err := io.CopyN(io.Discard, c, each)
		mu.Lock()
		upDone = later(upDone, time.Now())
		mu.Unlock()
		if err != nil {
			t.Errorf("target: got %d bytes up (%v), want %d", n, err, each)
		}
		if rest, err := io.ReadAll(c); err != nil || len(rest) != 0 {
			t.Errorf("target: %d bytes up past the %d sent (%v), want EOF", len(rest), each, err)
		}
		if err := <-werr; err != nil {
			t.Errorf("target: write: %v", err)
		}
		c.CloseWrite()
	})
	var wg sync.WaitGroup
	var downDone time.Time
	for range 2 {
		c := dialLink(t, l)
		up := randomBytes(t, each)
		wg.Go(func() {
			werr := make(chan error, 1)
			go func() {
				_, err := c.Write(up)
				if err == nil {
					err = c.CloseWrite()
				}
				werr <- err
			}()
			got := make([]byte, each)
			n, err := io.ReadFull(c, got)
			mu.Lock()
			downDone = later(downDone, time.Now())
			mu.Unlock()
			if err != nil || !bytes.Equal(got, down) {
				t.Errorf("client: got %d bytes down (%v), want the target's %d", n, err, each)
			}
			if rest, err := io.ReadAll(c); err != nil || len(rest) != 0 {
				t.Errorf("client: %d bytes down past the target's %d (%v), want EOF", len(rest), each, err)
			}
			if err := <-werr; err != nil {
				t.Errorf("client: write: %v", err)
			}
		})
	}
	wg.Wait()
	// A client's EOF comes after the target's half-close, which comes
	// after the target set upDone.
	bound := time.Duration(float64(2*each-burst) / bps * float64(time.Second))
	mu.Lock()
	defer mu.Unlock()
	if took := upDone.Sub(start); took < bound {
		t.Errorf("up: 1 MiB at 8 Mbit/s arrived in %v, faster than the link allows (%v)", took, bound)
	}
	if took := downDone.Sub(start); took < bound {
		t.Errorf("down: 1 MiB at 8 Mbit/s arrived in %v, faster than the link allows (%v)", took, bound)
	}
	t.Logf("bound %v: up %v, down %v", bound, upDone.Sub(start), downDone.Sub(start))
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// TestLinkRTTIsABound: every request/response round trip through the link
// takes at least the RTT, the first one included.
func TestLinkRTTIsABound(t *testing.T) {
	const rtt = 100 * time.Millisecond
	l := startLink(t, LinkOptions{RTT: rtt}, func(c *net.TCPConn) {
		r := bufio.NewReader(c)
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				return
			}
			if _, err := c.Write([]byte("re: " + line)); err != nil {
				return
			}
		}
	})
	c := dialLink(t, l)
	r := bufio.NewReader(c)
	for i := range 3 {
		start := time.Now()
		fmt.Fprintf(c, "ping %d\n", i)
		line, err := r.ReadString('\n')
		took := time.Since(start)
		if want := fmt.Sprintf("re: ping %d\n", i); err != nil || line != want {
			t.Fatalf("round trip %d: got %q (%v), want %q", i, line, err, want)
		}
		if took < rtt {
			t.Errorf("round trip %d took %v, less than the RTT %v", i, took, rtt)
		}
	}
}

// TestLinkDelayShiftsTheStream: pieces written 20 ms apart each arrive one
// one-way delay after they were written, not one delay after the piece
// before them arrived: the last of 20 pieces comes RTT/2 after it was
// written, where a delay summed over the pieces would make it come more
// than a second later.
func TestLinkDelayShiftsTheStream(t *testing.T) {
	const (
		rtt    = 200 * time.Millisecond
		pieces = 20
		size   = 1 << 10
	)
	arrived := make(chan time.Time, 1)
	l := startLink(t, LinkOptions{RTT: rtt}, func(c *net.TCPConn) {
		buf := make([]byte, size)
		for range pieces {
			if _, err := io.ReadFull(c, buf); err != nil {
				t.Errorf("target: %v", err)
				return
			}
		}
		arrived <- time.Now()
	})
	c := dialLink(t, l)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	var last time.Time
	for i := range pieces {
		if i > 0 {
			<-tick.C
		}
		last = time.Now()
		if _, err := c.Write(bytes.Repeat([]byte{byte(i)}, size)); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case at := <-arrived:
		lag := at.Sub(last)
		if lag < rtt/2 || lag > rtt/2+200*time.Millisecond {
			t.Errorf("the last piece arrived %v after it was written; want RTT/2 = %v (plus scheduling)", lag, rtt/2)
		}
	case <-time.After(ioDeadline):
		t.Fatal("the target never got all the pieces")
	}
}

// TestLinkHalfClose: each side's CloseWrite reaches the other side as EOF,
// and the other direction stays open to answer.
func TestLinkHalfClose(t *testing.T) {
	heard := make(chan string, 1)
	l := startLink(t, LinkOptions{RTT: 20 * time.Millisecond}, func(c *net.TCPConn) {
		first := make([]byte, 1)
		if _, err := io.ReadFull(c, first); err != nil {
			t.Errorf("target: %v", err)
			return
		}
		switch first[0] {
		case 'Q': // the client speaks first and half-closes
			req, err := io.ReadAll(c)
			if err != nil {
				t.Errorf("target: reading the request to EOF: %v", err)
				return
			}
			fmt.Fprintf(c, "answer to %q", req)
		case 'L': // the target speaks and half-closes, then listens
			c.Write([]byte("hello"))
			c.CloseWrite()
			b, err := io.ReadAll(c)
			if err != nil {
				t.Errorf("target: reading after its own half-close: %v", err)
			}
			heard <- string(b)
		}
	})

	c := dialLink(t, l)
	c.Write([]byte("Qrequest"))
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(c)
	if err != nil || string(got) != `answer to "request"` {
		t.Fatalf("client after its half-close: got %q (%v), want the answer and EOF", got, err)
	}

	c = dialLink(t, l)
	c.Write([]byte("L"))
	got, err = io.ReadAll(c)
	if err != nil || string(got) != "hello" {
		t.Fatalf("client: got %q (%v), want hello and EOF", got, err)
	}
	c.Write([]byte("bye"))
	c.CloseWrite()
	select {
	case s := <-heard:
		if s != "bye" {
			t.Fatalf("target heard %q after its half-close, want bye", s)
		}
	case <-time.After(ioDeadline):
		t.Fatal("the target never heard the client after its own half-close")
	}
}

// TestLinkCloseEndsLiveConnections: Close ends a connection in the middle
// of its life on both sides, and the link accepts nothing more.
func TestLinkCloseEndsLiveConnections(t *testing.T) {
	ended := make(chan error, 1)
	l := startLink(t, LinkOptions{RTT: 2 * time.Millisecond}, func(c *net.TCPConn) {
		_, err := io.Copy(c, c)
		ended <- err
	})
	c := dialLink(t, l)
	buf := make([]byte, 4)
	c.Write([]byte("live"))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "live" {
		t.Fatalf("echo before Close: %q (%v)", buf, err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Read(buf); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("client read after Close: %v; want the connection ended", err)
	}
	select {
	case err := <-ended:
		if errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("target: %v; want the connection ended", err)
		}
	case <-time.After(ioDeadline):
		t.Fatal("the target's connection lives on after Close")
	}
	if c, err := net.Dial("tcp", l.Addr().String()); err == nil {
		c.Close()
		t.Fatal("the link still accepts after Close")
	}
	if s := l.Stats(); s.Conns != 1 {
		t.Fatalf("stats %+v, want 1 connection", s)
	}
}

// TestLinkStats: the counts are the connections accepted and the bytes
// carried each way.
func TestLinkStats(t *testing.T) {
	const reply = 123457
	l := startLink(t, LinkOptions{}, func(c *net.TCPConn) {
		if _, err := io.Copy(io.Discard, c); err != nil {
			t.Errorf("target: %v", err)
		}
		c.Write(make([]byte, reply))
	})
	var up int64
	for _, n := range []int{300000, 7} {
		c := dialLink(t, l)
		c.Write(make([]byte, n))
		c.CloseWrite()
		got, err := io.ReadAll(c)
		if err != nil || len(got) != reply {
			t.Fatalf("client: %d bytes (%v), want %d", len(got), err, reply)
		}
		up += int64(n)
	}
	// Each count is added before the half-close that ends its direction,
	// which the clients and the target have seen.
	if s, want := l.Stats(), (LinkStats{Conns: 2, Up: up, Down: 2 * reply}); s != want {
		t.Fatalf("stats %+v, want %+v", s, want)
	}
}

// TestLinkTargetDown: a connection whose target cannot be dialed is
// closed at once and still counted.
func TestLinkTargetDown(t *testing.T) {
	gone, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gone.Close()
	l := startLinkTo(t, gone.Addr().String(), LinkOptions{})
	c := dialLink(t, l)
	if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("client read: %v; want the connection closed", err)
	}
	if s := l.Stats(); s != (LinkStats{Conns: 1}) {
		t.Fatalf("stats %+v, want 1 connection and no bytes", s)
	}
}
