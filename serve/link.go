package serve

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/time/rate"
)

// A Link relays TCP connections to a target over an emulated network link,
// for any stream the HTTP server's link cannot shape: a QEMU migration
// stream, a cloudlet's API, an overlay server other than serve's own.
//
// How the bytes move. Each accepted connection becomes a pair: the
// client's conn and a conn dialed to the target. Each direction of a pair
// is a pipe of two goroutines with a queue of stamped pieces between them:
//
//   - the reader reads at most burst bytes from its source, waits on the
//     direction's bucket for as many tokens (the time the bytes take to get
//     onto the link), stamps the piece with the time, and queues it. At EOF
//     it queues an end, stamped the same way, so the FIN crosses the link
//     too. Any other read error closes the queue without an end.
//   - the writer takes the pieces in order and writes each to the
//     destination once its stamp plus RTT/2 has passed; a piece whose time
//     has already come goes at once, so the delay shifts the stream and is
//     never summed over its pieces. The end becomes a CloseWrite on the
//     destination, and that is the pipe ending clean.
//
// Both directions of every pair share their direction's bucket, one for
// client to target and one for target to client, as both directions of a
// real link each have its rate. The queue holds at most queueDepth pieces;
// a sender further ahead than that is held back, as TCP's window would
// hold it.
//
// States of a pair: live (in Link.pairs, both pipes running); then each
// pipe ends clean or broken (a read error other than EOF, a write error,
// the context cancelled). A broken pipe aborts the pair: it cancels the
// pair's context and closes both conns, which breaks the other pipe too.
// Once both pipes have ended the pair is aborted anyway and leaves
// Link.pairs.
//
// What ends every wait: a Read or Write ends with data, an error, or the
// conn's close; the dial, the bucket, the queue's send and receive and the
// delay all end when the pair's context does. Close marks the link closed,
// closes the listener, cancels the link's context (every pair's parent),
// aborts every live pair and waits for every pair's goroutines. A pair that
// finishes dialing after that finds the link closed and aborts itself, so
// Close's wait is bounded too.
type Link struct {
	ln     net.Listener
	target string
	delay  time.Duration // one way: RTT/2
	up     *rate.Limiter // client to target; nil when unlimited
	down   *rate.Limiter // target to client; nil when unlimited
	log    zerolog.Logger

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup // one per pair being handled

	mu     sync.Mutex
	closed bool
	pairs  map[*pair]struct{}

	conns, upBytes, downBytes atomic.Int64
}

// LinkOptions configure a Link.
type LinkOptions struct {
	// Rate is each direction's capacity in bytes per second; 0 means
	// unlimited.
	Rate float64
	// RTT is the round-trip time: each direction delays its bytes by half
	// of it. Connection setup costs no round trip; the link delays data,
	// not the handshake.
	RTT time.Duration
	// Log gets a warning for each connection whose target cannot be
	// dialed, and at debug level a line for each connection.
	Log zerolog.Logger
}

// LinkStats count what a Link has carried.
type LinkStats struct {
	// Conns counts the connections accepted.
	Conns int64
	// Up and Down count the bytes delivered from client to target and from
	// target to client.
	Up, Down int64
}

// queueDepth bounds the pieces in flight on one direction of one pair,
// so at most queueDepth×burst bytes.
const queueDepth = 256

// dialTimeout bounds the dial of the target for one connection.
const dialTimeout = 10 * time.Second

// NewLink relays the connections listen accepts to target, a host:port
// dialed anew for each. Call Serve to start accepting.
func NewLink(listen net.Listener, target string, opt LinkOptions) *Link {
	ctx, cancel := context.WithCancel(context.Background())
	return &Link{
		ln: listen, target: target, delay: max(opt.RTT/2, 0),
		up: newBucket(opt.Rate), down: newBucket(opt.Rate), log: opt.Log,
		ctx: ctx, cancel: cancel, pairs: map[*pair]struct{}{},
	}
}

// Addr is the address the link listens on.
func (l *Link) Addr() net.Addr { return l.ln.Addr() }

// Stats returns the counts so far.
func (l *Link) Stats() LinkStats {
	return LinkStats{Conns: l.conns.Load(), Up: l.upBytes.Load(), Down: l.downBytes.Load()}
}

// Serve accepts connections until Close, and then returns nil; it
// returns an error if accepting fails otherwise.
func (l *Link) Serve() error {
	for {
		c, err := l.ln.Accept()
		l.mu.Lock()
		closed := l.closed
		if err == nil && !closed {
			l.wg.Add(1)
		}
		l.mu.Unlock()
		switch {
		case closed:
			if err == nil {
				c.Close()
			}
			return nil
		case err != nil:
			return fmt.Errorf("link: accept on %s: %w", l.ln.Addr(), err)
		}
		l.conns.Add(1)
		go l.handle(c)
	}
}

// Close stops accepting, ends every live connection and waits until their
// goroutines have returned.
func (l *Link) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	live := make([]*pair, 0, len(l.pairs))
	for p := range l.pairs {
		live = append(live, p)
	}
	l.mu.Unlock()
	err := l.ln.Close()
	l.cancel()
	for _, p := range live {
		p.abort()
	}
	l.wg.Wait()
	return err
}

// pair is one relayed connection.
type pair struct {
	client, target net.Conn
	cancel         context.CancelFunc
}

// abort ends both directions at once; it may be called more than once.
func (p *pair) abort() {
	p.cancel()
	p.client.Close()
	p.target.Close()
}

func (l *Link) handle(client net.Conn) {
	defer l.wg.Done()
	d := net.Dialer{Timeout: dialTimeout}
	target, err := d.DialContext(l.ctx, "tcp", l.target)
	if err != nil {
		client.Close()
		if l.ctx.Err() == nil {
			l.log.Warn().Str("client", client.RemoteAddr().String()).Err(err).Msg("link: cannot reach the target; connection closed")
		}
		return
	}
	ctx, cancel := context.WithCancel(l.ctx)
	p := &pair{client: client, target: target, cancel: cancel}
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		p.abort()
		return
	}
	l.pairs[p] = struct{}{}
	l.mu.Unlock()
	l.log.Debug().Str("client", client.RemoteAddr().String()).Msg("link: connection open")

	var wg sync.WaitGroup
	var errs [2]error
	wg.Go(func() { errs[0] = l.pipe(ctx, client, target, l.up, &l.upBytes, p.abort) })
	wg.Go(func() { errs[1] = l.pipe(ctx, target, client, l.down, &l.downBytes, p.abort) })
	wg.Wait()
	p.abort()
	l.mu.Lock()
	delete(l.pairs, p)
	l.mu.Unlock()
	l.log.Debug().Str("client", client.RemoteAddr().String()).AnErr("up", errs[0]).AnErr("down", errs[1]).Msg("link: connection closed")
}

// piece is what one read took from a source: data, or the source's end.
type piece struct {
	data []byte
	at   time.Time // when it was on the link
	end  bool
}

// errSourceFailed is a pipe whose source broke off without an EOF.
var errSourceFailed = errors.New("link: the sending side failed")

// pipe carries one direction of a pair from src to dst, and returns nil
// once src's end has been passed on as a half-close of dst. When it
// breaks it aborts the pair.
func (l *Link) pipe(ctx context.Context, src, dst net.Conn, bucket *rate.Limiter, count *atomic.Int64, abort func()) error {
	q := make(chan piece, queueDepth)
	var reader sync.WaitGroup
	reader.Go(func() { l.read(ctx, src, bucket, q) })
	err := l.write(ctx, dst, q, count)
	if err != nil {
		// The reader may be in src.Read or waiting on the bucket or the
		// queue: the abort ends each of those.
		abort()
	}
	reader.Wait()
	return err
}

// read is a pipe's reader: see Link.
func (l *Link) read(ctx context.Context, src net.Conn, bucket *rate.Limiter, q chan<- piece) {
	defer close(q)
	send := func(p piece) bool {
		select {
		case q <- p:
			return true
		case <-ctx.Done():
			return false
		}
	}
	buf := make([]byte, burst)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if bucket != nil && bucket.WaitN(ctx, n) != nil {
				return
			}
			if !send(piece{data: slices.Clone(buf[:n]), at: time.Now()}) {
				return
			}
		}
		if errors.Is(err, io.EOF) {
			send(piece{at: time.Now(), end: true})
			return
		}
		if err != nil {
			return
		}
	}
}

// write is a pipe's writer: see Link.
func (l *Link) write(ctx context.Context, dst net.Conn, q <-chan piece, count *atomic.Int64) error {
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for p := range q {
		if wait := time.Until(p.at.Add(l.delay)); wait > 0 {
			timer.Reset(wait)
			select {
			case <-timer.C:
			case <-ctx.Done():
				timer.Stop()
				return ctx.Err()
			}
		}
		if p.end {
			hc, ok := dst.(interface{ CloseWrite() error })
			if !ok {
				return fmt.Errorf("link: a %T cannot be half-closed", dst)
			}
			return hc.CloseWrite()
		}
		n, err := dst.Write(p.data)
		count.Add(int64(n))
		if err != nil {
			return err
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	return errSourceFailed
}
