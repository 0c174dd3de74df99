-- POST /collect with a ~320-byte JSON body and browser-like headers.
wrk.method = "POST"
wrk.body = '{"event":"page_view","url":"https://shop.example.com/products/12345?utm_source=newsletter&utm_medium=email","referrer":"https://www.example.org/search?q=running+shoes","screen":"1920x1080","lang":"ko-KR","session":"7f3c2a1e-9b8d-4c6e-a5f4-3d2b1c0e9f8a","ts_client":1732160000123,"props":{"price":129000,"currency":"KRW"}}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["User-Agent"] = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36"
wrk.headers["Cookie"] = "_ga=GA1.2.1234567890.1732160000; sid=abcdef0123456789"
wrk.headers["X-Forwarded-For"] = "81.2.69.160, 10.0.0.12"
